//! `cluster`: plain topics on two or three mqtt-im nodes sharing one PostgreSQL and one
//! Redis. First one node alone (publishers and subscribers on it), then the same load with
//! the other nodes up — subscribers on the publishers' node, then on the other nodes — and
//! last a node killed with SIGKILL while it has subscribers: how long until the other nodes
//! drop its routes, what was forwarded to it meanwhile, and what a subscriber on a node that
//! lives loses at QoS 0 and 1.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};

use mqtt_im::im::ImService;

use super::*;

#[derive(Debug, Clone, Args)]
pub(crate) struct ClusterArgs {
    #[command(flatten)]
    load: PubsubArgs,
    /// Nodes in the cluster runs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=3))]
    nodes: u8,
    /// Messages per second at each QoS (0 and 1) in the node-death run.
    #[arg(long, default_value_t = 1000)]
    death_rate: u64,
}

/// A node in this process.
struct Node {
    addr: SocketAddr,
    im: ImService,
    shutdown: CancellationToken,
}

impl Node {
    async fn start(cli: &Cli, id: &str) -> Result<Self, Error> {
        let mut config = mqtt_im_config(cli)?;
        config.cluster.node_id = id.to_owned();
        let server = Server::bind(config).await?;
        let (addr, im) = (server.local_addr()?, server.im());
        let shutdown = CancellationToken::new();
        tokio::spawn(server.run(shutdown.clone()));
        let node = Self { addr, im, shutdown };
        // Following the cluster's channels: the retained messages were loaded a second time.
        node.wait_for(
            "mqtt_im_background_rounds_total{task=\"retained_loads\"}",
            |n| n >= 2.0,
        )
        .await?;
        Ok(node)
    }

    /// The value of a metric series (the sum of the series starting with `series`).
    fn metric(&self, series: &str) -> f64 {
        self.im
            .metrics()
            .render()
            .lines()
            .filter(|line| line.starts_with(series))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |sum, value| sum + value)
    }

    /// Waits (up to 30 s) until `series` satisfies `ok`; how long that took.
    async fn wait_for(&self, series: &str, ok: impl Fn(f64) -> bool) -> Result<Duration, Error> {
        let started = Instant::now();
        while !ok(self.metric(series)) {
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("{series} stayed at {}", self.metric(series)).into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(started.elapsed())
    }
}

/// A node as its own process, to be killed.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `mqtt-im` binary as node `id` of the harness's cluster; its client address.
fn spawn_node(cli: &Cli, id: &str) -> Result<(Process, SocketAddr), Error> {
    use std::io::BufRead;
    let (Some(postgres), Some(redis)) = (&cli.postgres, &cli.redis) else {
        return Err("the cluster scenario needs --postgres and --redis".into());
    };
    let dir = tempfile::tempdir()?.keep();
    let tag = format!("bench_{}", std::process::id());
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqtt-im"))
        .env("MQTT_IM__LISTENERS__MQTT", "127.0.0.1:0")
        .env("MQTT_IM__STORE__PATH", dir.join("im.db"))
        .env("MQTT_IM__STORE__BACKEND", "postgres")
        .env("MQTT_IM__STORE__POSTGRES__URL", postgres)
        .env("MQTT_IM__STORE__POSTGRES__SCHEMA", &tag)
        .env("MQTT_IM__CLUSTER__REDIS_URL", redis)
        .env("MQTT_IM__CLUSTER__KEY_PREFIX", &tag)
        .env("MQTT_IM__CLUSTER__NODE_ID", id)
        .env("MQTT_IM__AUTH__ALLOW_ANONYMOUS", "true")
        .env("MQTT_IM__AUTH__UID_FROM", "client_id")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let process = Process(child);
    let mut stdout = std::io::BufReader::new(stdout);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("mqtt-im listening on ")
        .ok_or_else(|| format!("unexpected first line {line:?}"))?
        .parse()?;
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    Ok((process, addr))
}

pub(crate) async fn run(cli: &Cli, args: &ClusterArgs) -> Result<(), Error> {
    if cli.postgres.is_none() || cli.redis.is_none() {
        return Err("the cluster scenario needs --postgres and --redis".into());
    }
    let load = PubsubArgs {
        topics: Topics::Plain,
        ..args.load.clone()
    };
    println!(
        "cluster: {} publishers -> {} subscribers, QoS {}, {} B plain topics, {} s per run, {} nodes",
        load.publishers, load.subscribers, load.qos, load.size, load.duration, args.nodes
    );
    let first = Node::start(cli, "n1").await?;
    let alone = run_pubsub_across(first.addr, &[first.addr], &load, "a").await?;
    alone.print("one node");
    let mut others = Vec::new();
    for n in 2..=args.nodes {
        others.push(Node::start(cli, &format!("n{n}")).await?);
    }
    let same = run_pubsub_across(first.addr, &[first.addr], &load, "b").await?;
    same.print("same node");
    let elsewhere: Vec<SocketAddr> = others.iter().map(|node| node.addr).collect();
    let cross = run_pubsub_across(first.addr, &elsewhere, &load, "c").await?;
    cross.print("other node(s)");
    let failed = |node: &Node, reason: &str| {
        node.metric(&format!(
            "mqtt_im_forwards_failed_total{{reason=\"{reason}\"}}"
        ))
    };
    let dropped: Vec<String> = ["queue_full", "inject_queue_full", "injector", "redis"]
        .iter()
        .map(|reason| {
            let n = others.iter().fold(failed(&first, reason), |sum, node| {
                sum + failed(node, reason)
            });
            format!("{reason} {n}")
        })
        .collect();
    println!("{:>22}: {}", "forwards not delivered", dropped.join(", "));
    for (name, run) in [("same node", &same), ("other node(s)", &cross)] {
        println!(
            "{:>22}: throughput {:.0}% of one node, p50 {:.2}x, p99 {:.2}x",
            format!("{name} / one node"),
            100.0 * run.rate() / alone.rate(),
            run.percentile(0.5) / alone.percentile(0.5),
            run.percentile(0.99) / alone.percentile(0.99)
        );
    }
    node_death(cli, args, &first, &others[0]).await?;
    first.shutdown.cancel();
    for node in others {
        node.shutdown.cancel();
    }
    Ok(())
}

/// What the surviving subscriber received: sequence numbers per QoS.
#[derive(Default)]
struct Survived {
    qos0: HashSet<u64>,
    qos1: HashSet<u64>,
}

/// A node with a subscriber is killed while node 1 publishes to it and to a subscriber on
/// a node that lives.
async fn node_death(
    cli: &Cli,
    args: &ClusterArgs,
    publisher_node: &Node,
    survivor_node: &Node,
) -> Result<(), Error> {
    let (dying, dying_addr) = spawn_node(cli, "dying")?;
    let routes = "mqtt_im_cluster_routes_remote";
    let before = publisher_node.metric(routes);
    let (victim, mut victim_events) = connected(dying_addr, "death-victim", true, 100).await?;
    victim.subscribe("death/#", QoS::AtLeastOnce).await?;
    let victim_pump = tokio::spawn(async move { while victim_events.poll().await.is_ok() {} });
    let (survivor, mut survivor_events) =
        connected(survivor_node.addr, "death-survivor", true, 10_000).await?;
    survivor.subscribe("death/#", QoS::AtLeastOnce).await?;
    let survived = Arc::new(Mutex::new(Survived::default()));
    let heard = survived.clone();
    let survivor_pump = tokio::spawn(async move {
        while let Ok(event) = survivor_events.poll().await {
            let Event::Incoming(Packet::Publish(publish)) = event else {
                continue;
            };
            let Some(seq) = publish.payload.get(..8).and_then(|b| b.try_into().ok()) else {
                continue;
            };
            if let Ok(mut heard) = heard.lock() {
                let seq = u64::from_be_bytes(seq);
                // By topic: rumqttd 0.20 raises a QoS 0 publish to the subscription's QoS.
                match &publish.topic[..] {
                    "death/q0" => heard.qos0.insert(seq),
                    _ => heard.qos1.insert(seq),
                };
            }
        }
    });
    publisher_node
        .wait_for(routes, |n| n >= before + 2.0)
        .await?;

    let (publisher, mut publisher_events) =
        connected(publisher_node.addr, "death-publisher", true, 10_000).await?;
    let publisher_pump =
        tokio::spawn(async move { while publisher_events.poll().await.is_ok() {} });
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (pacing, stopping, counting) = (args.death_rate, stop.clone(), sent.clone());
    let publishing = tokio::spawn(async move {
        let mut pace = tokio::time::interval(Duration::from_micros(1_000_000 / pacing.max(1)));
        let mut seq = 0u64;
        while !stopping.load(Ordering::Relaxed) {
            pace.tick().await;
            let body = seq.to_be_bytes().to_vec();
            for (topic, qos) in [
                ("death/q0", QoS::AtMostOnce),
                ("death/q1", QoS::AtLeastOnce),
            ] {
                if publisher
                    .publish(topic, qos, false, body.clone())
                    .await
                    .is_err()
                {
                    return publisher;
                }
            }
            seq += 1;
            counting.store(seq, Ordering::Relaxed);
        }
        publisher
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failed = "mqtt_im_forwards_failed_total";
    let failed_before = publisher_node.metric(failed);
    let mut dying = dying;
    dying.0.kill()?;
    let killed = Instant::now();
    let _ = dying.0.wait();
    publisher_node
        .wait_for(routes, |n| n <= before + 1.0)
        .await?;
    let routes_gone = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let publisher = publishing.await?;
    // The survivor has everything once it is quiet.
    let mut last = (0, 0);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = survived
            .lock()
            .map(|s| (s.qos0.len(), s.qos1.len()))
            .unwrap_or_default();
        if now == last {
            break;
        }
        last = now;
    }
    let total = sent.load(Ordering::Relaxed);
    let (got0, got1) = last;
    println!(
        "{:>22}: routes gone {:.0} ms after SIGKILL (node_ttl {} ms); {} forwards to it failed meanwhile",
        "node death",
        routes_gone.as_secs_f64() * 1000.0,
        Config::default().cluster.node_ttl.0.as_millis(),
        publisher_node.metric(failed) - failed_before
    );
    println!(
        "{:>22}: a subscriber on a live node got QoS 0 {got0}/{total}, QoS 1 {got1}/{total} at {} msg/s each",
        "node death", args.death_rate
    );
    let _ = publisher.disconnect().await;
    let _ = victim.disconnect().await;
    let _ = survivor.disconnect().await;
    for pump in [publisher_pump, victim_pump, survivor_pump] {
        pump.abort();
    }
    Ok(())
}
