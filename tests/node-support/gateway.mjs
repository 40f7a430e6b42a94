// Finds or starts the dev gateway the node checks run against. No dependencies: each check's
// own node project imports this file by path.
//
// GATEWAY_URL (e.g. http://127.0.0.1:8080) and GATEWAY_TOKEN (a bearer token for the demo
// practitioner) point at a gateway someone else started, as tests/run-node-tests.sh does.
// Without them, `target/debug/smd-gateway` is started in dev mode on free ports with a fresh
// data directory, and the demo practitioner's token is read from its banner. Nothing is built.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const repository = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** A free TCP port on loopback. */
export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

/** The demo practitioner's (Dr Mei Chen's) token in a dev-mode banner, or undefined. */
export function practitionerTokenFromBanner(banner) {
  const match = /practitioner\s+Dr Mei Chen\s*\n\s*(eyJ[\w.-]+)/.exec(banner);
  return match ? match[1] : undefined;
}

/**
 * The gateway to test: { url, wsUrl, token, stop() }.
 * Starts one (and stops it in stop()) only when GATEWAY_URL is not set.
 */
export async function gateway({ timeoutMs = 60_000 } = {}) {
  if (process.env.GATEWAY_URL) {
    const url = process.env.GATEWAY_URL.replace(/\/$/, '');
    const token = process.env.GATEWAY_TOKEN;
    if (!token) throw new Error('GATEWAY_URL is set but GATEWAY_TOKEN is not');
    return { url, wsUrl: url.replace(/^http/, 'ws'), token, stop: async () => {} };
  }
  const binary = process.env.GATEWAY_BINARY || join(repository, 'target', 'debug', 'smd-gateway');
  if (!existsSync(binary)) {
    throw new Error(`${binary} is missing: run \`cargo build -p smd-gateway\` first`);
  }
  const dataDir = mkdtempSync(join(tmpdir(), 'smd-node-check-'));
  const port = await freePort();
  const sandboxPort = await freePort();
  const child = spawn(binary, [], {
    env: {
      ...process.env,
      SMD_DATA_DIR: dataDir,
      SMD_LISTEN: `127.0.0.1:${port}`,
      SMD_SANDBOX_LISTEN: `127.0.0.1:${sandboxPort}`,
      RUST_LOG: process.env.RUST_LOG || 'warn',
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) {
      console.error(
        `the gateway had already stopped (${child.exitCode ?? child.signalCode}); its output:\n${output}`,
      );
    } else {
      child.kill('SIGTERM');
      await new Promise((done) => child.once('exit', done));
    }
    rmSync(dataDir, { recursive: true, force: true });
  };
  try {
    const url = await new Promise((ready, fail) => {
      const timer = setTimeout(
        () => fail(new Error(`the gateway did not print "ready" within ${timeoutMs} ms:\n${output}`)),
        timeoutMs,
      );
      const read = (chunk) => {
        output += chunk;
        const line = /^ready playground=(\S+)/m.exec(output);
        if (line) {
          clearTimeout(timer);
          ready(new URL(line[1]).origin);
        }
      };
      child.stdout.on('data', read);
      child.stderr.on('data', (chunk) => (output += chunk));
      child.once('exit', (code) => {
        clearTimeout(timer);
        fail(new Error(`the gateway exited with ${code} before it was ready:\n${output}`));
      });
    });
    const token = practitionerTokenFromBanner(output);
    if (!token) throw new Error(`no demo practitioner token in the banner:\n${output}`);
    return { url, wsUrl: url.replace(/^http/, 'ws'), token, stop };
  } catch (error) {
    await stop();
    throw error;
  }
}
