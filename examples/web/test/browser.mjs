// Drives the web demo in headless Chromium (Debian's package, through playwright-core):
// log in, see the unread badge from the digest, open the conversation, page its backlog with
// pull-and-ack, send a message; saves a screenshot. Run by tests/web.rs, which starts the
// broker and checks the other side over MQTT.
//
// Environment: BROKER_WS (ws://host:port/path), USER_NAME, PASSWORD, PEER (the conversation
// with the unread messages), UNREAD (its expected badge), SEND_TEXT, SCREENSHOT (file).
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const root = fileURLToPath(new URL("..", import.meta.url));
const types = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".proto": "text/plain" };

// The page's own files, as `scripts/web.sh` serves them.
const server = createServer(async (request, response) => {
  const path = normalize(decodeURIComponent(new URL(request.url, "http://x").pathname));
  const file = join(root, path === "/" ? "index.html" : path);
  try {
    if (!file.startsWith(root)) throw new Error("outside");
    const body = await readFile(file);
    response.writeHead(200, { "Content-Type": types[extname(file)] || "application/octet-stream" });
    response.end(body);
  } catch {
    response.writeHead(404).end();
  }
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const url = `http://127.0.0.1:${server.address().port}/?page=2&broker=${encodeURIComponent(env("BROKER_WS"))}`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const page = await browser.newPage({ viewport: { width: 900, height: 600 } });
const failures = [];
page.on("pageerror", (error) => failures.push(`page error: ${error.message}`));
page.on("console", (message) => message.type() === "error" && failures.push(`console: ${message.text()}`));

const step = async (what, action) => {
  try {
    await action();
    console.log(`ok: ${what}`);
  } catch (error) {
    await page.screenshot({ path: env("SCREENSHOT") }).catch(() => {});
    throw new Error(`${what}: ${error.message}\n${failures.join("\n")}`);
  }
};
const timeout = { timeout: 10000 };
const peer = `li[data-conversation="u/${env("PEER")}"]`;
const messages = page.locator("#messages .message");
const expectCount = async (locator, count) => {
  await page.waitForFunction(
    ([selector, n]) => document.querySelectorAll(selector).length === n,
    [locator, count],
    timeout,
  );
};

try {
  await step("page loads", () => page.goto(url));
  await step("log in", async () => {
    await page.fill("#user", env("USER_NAME"));
    await page.fill("#password", env("PASSWORD"));
    await page.click("#login");
    await page.locator("#chat").waitFor({ state: "visible", ...timeout });
  });
  await step(`badge shows ${env("UNREAD")} unread`, async () => {
    const badge = page.locator(`${peer} .badge`);
    await badge.waitFor(timeout);
    await page.waitForFunction(
      ([selector, text]) => document.querySelector(selector)?.textContent === text,
      [`${peer} .badge`, env("UNREAD")],
      timeout,
    );
  });
  await step("open the conversation: newest page", async () => {
    await page.click(peer);
    await expectCount("#messages .message", 2);
    await page.locator("#older").waitFor({ state: "visible", ...timeout });
  });
  await step("pull the older page (acknowledging the first)", async () => {
    await page.click("#older");
    await expectCount("#messages .message", Number(env("UNREAD")));
    await page.locator("#older").waitFor({ state: "hidden", ...timeout });
    const seqs = await messages.evaluateAll((items) => items.map((item) => item.dataset.seq));
    const expected = Array.from({ length: seqs.length }, (_, i) => String(i + 1));
    if (seqs.join() !== expected.join()) throw new Error(`seqs ${seqs} are not ${expected}`);
  });
  await step("badge cleared", async () => {
    await page.waitForFunction((selector) => document.querySelector(selector)?.textContent === "", `${peer} .badge`, timeout);
  });
  await step("send a message", async () => {
    await page.fill("#text", env("SEND_TEXT"));
    await page.click("#send");
    await page.locator("#messages .message.sent").waitFor(timeout);
  });
  await page.screenshot({ path: env("SCREENSHOT") });
  if (failures.length) throw new Error(failures.join("\n"));
} finally {
  await browser.close();
  server.close();
}
