// A TCP proxy for tests of apps on @mqtt-im/client (this package's own tests and the web
// demo's browser test): it drops the network or loses the server's bytes the way a phone's
// link does, and can be pointed at a restarted broker.
import net from "node:net";

/**
 * Proxies to `port` on `host`. Modes: "up", "mute" (the broker's bytes are dropped, the
 * client's still pass) or "down" (open links are cut, new ones refused).
 */
export async function proxy(port, host = "127.0.0.1") {
  const sockets = new Set();
  let mode = "up";
  let target = { port: Number(port), host };
  const server = net.createServer((inbound) => {
    if (mode === "down") return inbound.destroy();
    const outbound = net.connect(target.port, target.host);
    sockets.add(inbound).add(outbound);
    inbound.on("data", (chunk) => outbound.write(chunk));
    outbound.on("data", (chunk) => mode !== "mute" && inbound.write(chunk));
    const end = () => {
      inbound.destroy();
      outbound.destroy();
      sockets.delete(inbound);
      sockets.delete(outbound);
    };
    inbound.on("close", end).on("error", end);
    outbound.on("close", end).on("error", end);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: server.address().port,
    set(next) {
      mode = next;
      if (next === "down") for (const socket of sockets) socket.destroy();
    },
    /** New links go to another port (a restarted broker); open ones stay where they are. */
    retarget(next) {
      target = { ...target, port: Number(next) };
    },
    close() {
      for (const socket of sockets) socket.destroy();
      server.close();
    },
  };
}
