#!/usr/bin/env node
// Example filter in Node.js (standard library only): verify the signature, then tag and archive.
//
// Every request must carry a valid Standard Webhooks v1 signature made with one of the
// secrets in FILTER_SECRET; anything else gets 401. At `eom` the answer adds
// `X-Filtered-By: node-tagger` and a header with the number of recipients, and adds an
// archive copy recipient with NOTIFY=NEVER for mail from ARCHIVE_DOMAIN. Any other event:
// continue. See README.md for the settings and the bridge's [[endpoints]] entry.
"use strict";

const crypto = require("node:crypto");
const http = require("node:http");

// Seconds a webhook-timestamp may differ from this machine's clock.
const TOLERANCE_SECONDS = 5 * 60;
// Request bodies above this size are refused with 413 (an eom request without the body is small).
const MAX_BODY_BYTES = 16 * 1024 * 1024;
// Webhook-ids remembered for replay refusal (about 100 bytes each), as in milterbridge.sdk's Verifier.
const MAX_IDS = 100000;

class Unauthorized extends Error {}

// The HMAC keys from "whsec_<base64>" secrets, separated by whitespace or commas (several during a key rotation).
function parseSecrets(text) {
  const secrets = (text || "").split(/[\s,]+/).filter((s) => s !== "");
  if (secrets.length === 0) {
    throw new Error("FILTER_SECRET is not set (one or more whsec_... secrets, space-separated)");
  }
  return secrets.map((secret, i) => {
    const encoded = secret.startsWith("whsec_") ? secret.slice("whsec_".length) : secret;
    if (!/^[A-Za-z0-9+/]+={0,2}$/.test(encoded)) {
      throw new Error(`FILTER_SECRET: secret #${i + 1} is not whsec_ followed by base64`);
    }
    return Buffer.from(encoded, "base64");
  });
}

// Remembers accepted webhook-ids while their timestamp is fresh, so a captured request cannot be replayed.
// At most `maxIds` are kept: when full, the id accepted first is dropped (its timestamp is
// among the closest to going stale), so a flood of requests costs bounded memory.
class ReplayGuard {
  constructor(maxIds = MAX_IDS) {
    if (!(Number.isInteger(maxIds) && maxIds >= 1)) throw new RangeError("maxIds must be a positive integer");
    this.maxIds = maxIds;
    this.expiry = new Map(); // webhook-id -> Unix seconds after which the timestamp check refuses it anyway
  }

  get size() {
    return this.expiry.size;
  }

  admit(id, timestamp, now) {
    for (const [seen, until] of this.expiry) {
      if (until >= now) break; // insertion order is nearly expiry order; the rest go on a later call
      this.expiry.delete(seen);
    }
    if (this.expiry.has(id)) {
      throw new Unauthorized(`webhook-id ${JSON.stringify(id)} was already received (a replay)`);
    }
    while (this.expiry.size >= this.maxIds) {
      this.expiry.delete(this.expiry.keys().next().value);
    }
    this.expiry.set(id, timestamp + TOLERANCE_SECONDS);
  }
}

// Throws Unauthorized unless the request is signed by one of `keys` with a fresh timestamp.
function verify(keys, guard, headers, body, now) {
  const id = headers["webhook-id"];
  const timestamp = headers["webhook-timestamp"];
  const signatures = headers["webhook-signature"];
  if (!id || !timestamp || !signatures) {
    throw new Unauthorized("webhook-id, webhook-timestamp or webhook-signature is missing");
  }
  if (!/^\d{1,12}$/.test(timestamp)) {
    throw new Unauthorized("webhook-timestamp is not a number of seconds");
  }
  const ts = Number(timestamp);
  if (Math.abs(now - ts) > TOLERANCE_SECONDS) {
    throw new Unauthorized(`webhook-timestamp is more than ${TOLERANCE_SECONDS} s from now`);
  }
  const signed = Buffer.concat([Buffer.from(`${id}.${timestamp}.`), body]);
  const expected = keys.map((key) => crypto.createHmac("sha256", key).update(signed).digest());
  const offered = signatures
    .split(" ")
    .filter((entry) => entry.startsWith("v1,"))
    .map((entry) => Buffer.from(entry.slice(3), "base64"));
  // timingSafeEqual needs equal lengths; an HMAC-SHA256 is always 32 bytes, so the length tells nothing.
  const match = offered.some((sig) =>
    expected.some((mac) => sig.length === mac.length && crypto.timingSafeEqual(sig, mac)),
  );
  if (!match) {
    throw new Unauthorized("no valid signature by a known secret");
  }
  guard.admit(id, ts, now);
}

// The decision for one request (the webhook JSON contract, docs/webhooks.md).
function decide(request, archiveDomain, archiveAddress) {
  if (request.event !== "eom") {
    return { action: "continue" };
  }
  const message = request.message;
  const modifications = [
    { op: "add_header", name: "X-Filtered-By", value: "node-tagger" },
    { op: "add_header", name: "X-Recipient-Count", value: String(message.rcpt_to.length) },
  ];
  if (archiveDomain && message.mail_from.address.toLowerCase().endsWith("@" + archiveDomain)) {
    modifications.push({ op: "add_rcpt", address: archiveAddress, args: ["NOTIFY=NEVER"] });
  }
  return { action: "continue", modifications };
}

function answer(response, status, body, type = "application/json") {
  const bytes = Buffer.from(body);
  response.writeHead(status, { "Content-Type": type, "Content-Length": bytes.length });
  response.end(bytes);
}

function makeServer({ keys, archiveDomain, archiveAddress, log }) {
  const guard = new ReplayGuard();
  return http.createServer((request, response) => {
    if (request.method !== "POST") {
      answer(response, 405, "POST only\n", "text/plain");
      return;
    }
    const chunks = [];
    let size = 0;
    request.on("data", (chunk) => {
      size += chunk.length;
      if (size <= MAX_BODY_BYTES) chunks.push(chunk);
    });
    request.on("end", () => {
      if (size > MAX_BODY_BYTES) {
        answer(response, 413, "request body too large\n", "text/plain");
        return;
      }
      const body = Buffer.concat(chunks);
      try {
        verify(keys, guard, request.headers, body, Math.floor(Date.now() / 1000));
      } catch (error) {
        if (!(error instanceof Unauthorized)) throw error;
        log(`refused a request from ${request.socket.remoteAddress}: ${error.message}`);
        answer(response, 401, "signature check failed\n", "text/plain");
        return;
      }
      let decision;
      try {
        decision = decide(JSON.parse(body.toString("utf8")), archiveDomain, archiveAddress);
      } catch (error) {
        log(`answered 400 to a signed request: ${error.message}`);
        answer(response, 400, "not a milterbridge request\n", "text/plain");
        return;
      }
      answer(response, 200, JSON.stringify(decision));
    });
  });
}

function main() {
  const env = process.env;
  let keys;
  try {
    keys = parseSecrets(env.FILTER_SECRET);
  } catch (error) {
    console.error(`node-tagger: ${error.message}`);
    process.exit(2);
  }
  const host = env.HOST || "127.0.0.1";
  const port = Number(env.PORT || 8081);
  const archiveDomain = (env.ARCHIVE_DOMAIN ?? "example.com").toLowerCase();
  const archiveAddress = env.ARCHIVE_ADDRESS || `archive@${archiveDomain}`;
  const log = (line) => console.error(`node-tagger: ${line}`);
  const server = makeServer({ keys, archiveDomain, archiveAddress, log });
  server.listen(port, host, () => {
    const address = server.address();
    // One line on stdout, so a supervisor (or a test) started with PORT=0 learns the port.
    console.log(`node-tagger listening on http://${host}:${address.port}/`);
  });
  for (const signal of ["SIGINT", "SIGTERM"]) {
    process.on(signal, () => {
      server.close(() => process.exit(0));
      server.closeIdleConnections(); // kept-alive connections of the bridge would hold close() open
    });
  }
}

if (require.main === module) {
  main();
}

module.exports = { ReplayGuard, Unauthorized, TOLERANCE_SECONDS, MAX_IDS };
