//! Arbitrary bytes after a valid CONNECT, through a real mqtt-im (hook layer, embedded rumqttd,
//! embedded store) on loopback. The connection may be closed or answered with an error, but
//! no panic may happen anywhere (a panic hook aborts, so the fuzzer sees it), and the server
//! must accept the next connection.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mqtt_im::server::CancellationToken;
use mqtt_im::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

struct Target {
    runtime: Runtime,
    addr: SocketAddr,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        std::panic::set_hook(Box::new(|info| {
            eprintln!("panic: {info}");
            std::process::abort();
        }));
        let runtime = Runtime::new().expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let addr = runtime.block_on(async {
            let mut config = Config::default();
            config.listeners.mqtt = "127.0.0.1:0".parse().expect("address");
            config.store.path = dir.join("im.db");
            config.auth.plaintext = true;
            config.auth.users.insert("alice".into(), "pw".into());
            let server = Server::bind(config).await.expect("server");
            let addr = server.local_addr().expect("address");
            tokio::spawn(server.run(CancellationToken::new()));
            addr
        });
        Target { runtime, addr }
    })
}

/// CONNECT (MQTT 3.1.1 or 5 by the first input byte) for alice.
fn connect(v5: bool) -> Vec<u8> {
    let mut body = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        if v5 { 5 } else { 4 },
        0xC2,
        0,
        30,
    ];
    if v5 {
        body.push(0); // no properties
    }
    for field in [&b"fuzz"[..], b"alice", b"pw"] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

async fn exchange(addr: SocketAddr, v5: bool, data: &[u8]) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&connect(v5)).await?;
    let mut connack = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut connack)).await;
    stream.write_all(data).await?;
    let mut sink = [0u8; 4096];
    // Read what the server answers until it closes or goes quiet.
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(5), stream.read(&mut sink)).await
    {
        if n == 0 {
            break;
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let target = target();
    let v5 = data.first().is_some_and(|b| b & 1 == 1);
    target.runtime.block_on(async {
        let _ = exchange(target.addr, v5, data.get(1..).unwrap_or_default()).await;
        // The server still serves others.
        let mut probe = TcpStream::connect(target.addr).await.expect("server gone");
        probe.write_all(&connect(false)).await.expect("server gone");
        let mut connack = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), probe.read_exact(&mut connack))
            .await
            .expect("no CONNACK: the server stopped serving")
            .expect("no CONNACK: the server stopped serving");
        assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK refused");
    });
});
