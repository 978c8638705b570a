// Drives the built page in headless Chromium against a real vcn server.
// Started by ../e2e.sh, which sets E2E_* and serves the page.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import path from "node:path";
import { chromium } from "playwright-core";
import { fromBinary } from "@bufbuild/protobuf";
import { IssueCardResponseSchema } from "../src/gen/vcn/v1/vcn_pb.js";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run this through e2e.sh`);
  return v;
};
const PAGE = env("E2E_PAGE_URL");
const OWNER = env("E2E_OWNER");
const FUNDING = "4111111111111111";

// Chromium on a closed network, as root: no sandbox, no GPU, no QUIC, and
// none of the background fetches it would otherwise wait on. playwright
// gives it a fresh profile directory of its own.
const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

let browser;
let page;
const consoleErrors = [];

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ARGS,
    timeout: 60_000,
  });
  page = await browser.newPage();
  page.setDefaultTimeout(20_000);
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(PAGE);
  await page.waitForSelector("body[data-ready=true]");
});

after(async () => {
  if (page && process.env.E2E_OUT) {
    await page.screenshot({ path: path.join(process.env.E2E_OUT, "web-e2e.png"), fullPage: true });
  }
  await browser?.close();
});

/** The messages of a gRPC-Web response body (trailer frames skipped). */
function grpcWebMessages(body) {
  const out = [];
  for (let at = 0; at + 5 <= body.length; ) {
    const flag = body[at];
    const len = body.readUInt32BE(at + 1);
    if ((flag & 0x80) === 0) out.push(body.subarray(at + 5, at + 5 + len));
    at += 5 + len;
  }
  return out;
}

/** Every text a person could see or copy from the page, inputs included. */
async function everythingShown() {
  return page.evaluate(() => {
    const values = [...document.querySelectorAll("input, select, textarea")].map((e) => e.value);
    return [document.documentElement.outerHTML, document.body.innerText, ...values].join("\n");
  });
}

test("the page loads the customer's (empty) card list over gRPC-Web", async () => {
  assert.equal(await page.locator("#error").isHidden(), true, await page.locator("#error").innerText());
  assert.match(await page.locator("#customer").innerText(), new RegExp(OWNER));
  assert.equal(await page.locator("#cards tbody tr").count(), 0);
  assert.equal(await page.locator("#no-cards").isVisible(), true);
});

let issued; // the IssueCardResponse the page received

test("a card issued from the page is listed, showing only its masked number", async () => {
  await page.fill("#funding-pan", "4111 1111 1111 1111");
  await page.fill("#amount", "25.50");
  await page.selectOption("#currency", "EUR");
  await page.fill("#valid-days", "7");
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith("/vcn.v1.CardService/IssueCard")),
    page.click("#issue button[type=submit]"),
  ]);
  assert.equal(response.status(), 200);
  assert.equal(response.headers()["access-control-allow-origin"], PAGE);
  const [message] = grpcWebMessages(await response.body());
  issued = fromBinary(IssueCardResponseSchema, message);
  const { pan, card } = issued;
  assert.match(pan, /^411111\d{10}$/, "a full virtual number came back to the page");
  assert.equal(card.maskedPan, `${pan.slice(0, 6)}******${pan.slice(-4)}`);

  const row = page.locator(`#cards tbody tr[data-card-id="${card.cardId}"]`);
  await row.waitFor();
  const cells = await row.locator("td").allInnerTexts();
  assert.deepEqual(cells.slice(0, 5), [card.maskedPan, "active", "25.50 EUR", "0.00 EUR", "25.50 EUR"]);
  const validUntil = new Date(cells[5]);
  const days = (validUntil.getTime() - Date.now()) / 86_400_000;
  assert.ok(days > 5 && days < 8, `valid until ${cells[5]}`);
  assert.equal(await page.locator("#issued").innerText(), `Card issued: ${card.maskedPan}`);

  const shown = await everythingShown();
  assert.ok(!shown.includes(pan), "the full virtual number is on the page");
  assert.ok(!shown.includes(FUNDING), "the funding card number stayed on the page");
  assert.ok(!/\b(cvv|cvc)\b/i.test(await page.locator("body").innerText()), "a CVV is shown");
});

test("after a reload the card is listed from the server", async () => {
  await page.reload();
  await page.waitForSelector("body[data-ready=true]");
  const rows = page.locator("#cards tbody tr");
  assert.equal(await rows.count(), 1);
  assert.equal(await rows.first().locator("td").first().innerText(), issued.card.maskedPan);
  assert.ok(!(await everythingShown()).includes(issued.pan));
  // And the service agrees, asked over native gRPC by the vcn CLI.
  const listed = execFileSync(env("E2E_VCN_BIN"), ["card", "list", "--owner", OWNER, "--json"], {
    env: { ...process.env, VCN_API_KEY: env("E2E_API_KEY"), VCN_SERVER: env("E2E_SERVER") },
    encoding: "utf8",
  });
  assert.ok(listed.includes(issued.card.cardId), listed);
});

test("the service's error for a bad field reaches the page, and nothing is issued", async () => {
  await page.fill("#funding-pan", "4111111111111112"); // fails Luhn: only the server checks
  await page.fill("#amount", "10");
  await page.click("#issue button[type=submit]");
  const error = page.locator("#error");
  await error.waitFor();
  const text = await error.innerText();
  assert.match(text, /funding_pan/, text);
  assert.match(text, /INVALID_ARGUMENT|InvalidArgument/, text);
  assert.equal(await page.locator("#cards tbody tr").count(), 1);
  assert.deepEqual(consoleErrors, [], "errors in the browser console");
});
