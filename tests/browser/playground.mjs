// Opens the gateway's GraphiQL playground in Debian's headless Chromium with every host but the
// gateway blocked, and checks what a person would: the page draws, the docs explorer shows the
// schema (introspection), autocomplete offers fields, `{ me { id name role } }` answers as the
// demo practitioner, and a subscription's WebSocket carries the Headers pane's token.
//
// Fails (exit 1) when the page stays blank, the schema cannot be fetched, any request to another
// host is attempted, or the browser reports a Content-Security-Policy violation. A screenshot is
// always saved; its path is the last line printed.
//
//   node playground.mjs                     # starts target/debug/smd-gateway in dev mode itself
//   GATEWAY_URL=http://127.0.0.1:8080 GATEWAY_TOKEN=eyJ… node playground.mjs
//
// CHROMIUM (default /usr/bin/chromium) and SCREENSHOT (default artifacts/playground.png) may be set.

import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

import { gateway } from '../node-support/gateway.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const screenshotPath = resolve(process.env.SCREENSHOT || join(here, 'artifacts', 'playground.png'));
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const STEP_TIMEOUT_MS = 30_000;

const checks = [];
function pass(what) {
  checks.push(what);
  console.log(`ok   ${what}`);
}

async function main() {
  const server = await gateway();
  const gatewayHost = new URL(server.url).host;
  const userDataDir = mkdtempSync(join(tmpdir(), 'smd-chromium-'));
  const blocked = [];
  const cspViolations = [];
  const pageErrors = [];
  const webSocketFrames = { sent: [], received: [] };
  let context;
  let page;
  let failure;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath,
      headless: true,
      viewport: { width: 1400, height: 900 },
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        // A second wall behind the request interception: no other name resolves at all.
        '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost',
      ],
    });
    // Every HTTP request the pages make passes here; anything not for the gateway is refused.
    await context.route('**/*', (route) => {
      const url = new URL(route.request().url());
      if (url.host === gatewayHost) return route.continue();
      blocked.push(route.request().url());
      return route.abort('blockedbyclient');
    });
    page = context.pages()[0] ?? (await context.newPage());
    page.on('console', (message) => {
      const text = message.text();
      if (process.env.DEBUG) console.log(`console ${message.type()}: ${text}`);
      if (/Content[- ]Security[- ]Policy/i.test(text)) cspViolations.push(text);
    });
    page.on('pageerror', (error) => pageErrors.push(String(error)));
    // WebSockets are not routed; watch them instead, and count one to another host as blocked.
    page.on('websocket', (socket) => {
      if (new URL(socket.url()).host !== gatewayHost) blocked.push(socket.url());
      socket.on('framesent', (frame) => webSocketFrames.sent.push(String(frame.payload)));
      socket.on('framereceived', (frame) => webSocketFrames.received.push(String(frame.payload)));
    });

    const response = await page.goto(`${server.url}/graphql`, { waitUntil: 'load' });
    const policy = response.headers()['content-security-policy'] || '';
    if (!policy.includes("default-src 'self'")) {
      throw new Error(`the page has no Content-Security-Policy restricting it to itself: "${policy}"`);
    }
    pass('the page is served with a self-only Content-Security-Policy');

    await page
      .locator('.graphiql-container')
      .waitFor({ timeout: STEP_TIMEOUT_MS })
      .catch(async () => {
        const text = (await page.locator('body').innerText().catch(() => '')).trim();
        throw new Error(`GraphiQL did not draw (the page says: "${text.slice(0, 300)}")`);
      });
    pass('GraphiQL draws');

    // Docs explorer: the schema arrives by introspection, then the Query type lists its fields.
    await page.locator('button[aria-label="Show Documentation Explorer"]').click();
    const docs = page.locator('.graphiql-doc-explorer');
    await docs
      .getByText('Root Types')
      .waitFor({ timeout: STEP_TIMEOUT_MS })
      .catch(async () => {
        const text = (await docs.innerText().catch(() => '')).trim();
        throw new Error(`the docs explorer never showed the schema (it says: "${text.slice(0, 300)}")`);
      });
    await docs.locator('a.graphiql-doc-explorer-type-name', { hasText: /^Query$/ }).first().click();
    for (const field of ['me', 'integrations', 'creditPacks']) {
      await docs
        .locator('.graphiql-doc-explorer-field-name', { hasText: new RegExp(`^${field}$`) })
        .first()
        .waitFor({ timeout: STEP_TIMEOUT_MS });
    }
    pass('the docs explorer shows Query with me, integrations and creditPacks');

    // The Headers pane starts with the demo practitioner's token (dev mode).
    const headers = await page.evaluate(() =>
      // The Variables and Headers editors share the tools area; only Headers could hold this.
      [...document.querySelectorAll('.graphiql-editor-tool .CodeMirror')]
        .map((element) => element.CodeMirror.getValue())
        .join('\n'),
    );
    if (!/"Authorization":\s*"Bearer eyJ/.test(headers)) {
      throw new Error(`the Headers pane holds no demo token: ${JSON.stringify(headers)}`);
    }
    pass('the Headers pane is pre-filled with a bearer token');

    // Autocomplete: typing inside `me { … }` offers Me's fields, which come from the schema.
    await setQuery(page, '{ me { \n} }');
    await page.evaluate(() => {
      const editor = document.querySelector('.graphiql-query-editor .CodeMirror').CodeMirror;
      editor.focus();
      editor.setCursor({ line: 0, ch: 7 });
    });
    await page.keyboard.type('na');
    await page
      .locator('.CodeMirror-hints .CodeMirror-hint', { hasText: /^name$/ })
      .first()
      .waitFor({ timeout: STEP_TIMEOUT_MS });
    await page.keyboard.press('Escape');
    pass('autocomplete offers `name` inside `me { … }`');

    await setQuery(page, '{ me { id name role } }');
    await page.locator('.graphiql-execute-button').click();
    const result = await waitForResult(page, (text) => text.includes('"data"') || text.includes('"errors"'));
    if (!result.includes('"dr-chen"') || !result.includes('PRACTITIONER')) {
      throw new Error(`{ me { id name role } } did not answer as dr-chen: ${result}`);
    }
    pass('{ me { id name role } } answers as dr-chen');

    // A subscription opens /graphql/ws with the Headers pane's token in connection_init.
    await setQuery(page, 'subscription { messageStatusChanged { id status } }');
    await page.locator('.graphiql-execute-button').click();
    await waitUntil(
      () => webSocketFrames.received.some((frame) => frame.includes('"connection_ack"')),
      'the subscription WebSocket was never acknowledged',
    ).catch(async (error) => {
      const shown = await editorValue(page, '.graphiql-response');
      throw new Error(
        `${error.message} (frames sent ${JSON.stringify(webSocketFrames.sent)}, received ` +
          `${JSON.stringify(webSocketFrames.received)}; the result pane shows ${JSON.stringify(shown)})`,
      );
    });
    const init = webSocketFrames.sent.find((frame) => frame.includes('"connection_init"'));
    if (!init || !/"Authorization":"Bearer eyJ/.test(init)) {
      throw new Error(`connection_init carried no token: ${init}`);
    }
    await waitUntil(
      () => webSocketFrames.sent.some((frame) => frame.includes('"subscribe"')),
      'the subscription was never sent',
    );
    await page.waitForTimeout(500);
    const refused = webSocketFrames.received.find((frame) => frame.includes('"error"'));
    if (refused) throw new Error(`the subscription was refused: ${refused}`);
    pass('a subscription connects over /graphql/ws with the token in connection_init');
    // Stop it, so the result pane shows the query's answer again for the screenshot.
    await page.locator('.graphiql-execute-button').click();
    await setQuery(page, '{ me { id name role } }');
    await page.locator('.graphiql-execute-button').click();
    await waitForResult(page, (text) => text.includes('"dr-chen"'));

    if (cspViolations.length > 0) {
      throw new Error(`the browser reported Content-Security-Policy violations:\n${cspViolations.join('\n')}`);
    }
    pass('no Content-Security-Policy violations');
    if (pageErrors.length > 0) {
      throw new Error(`the page threw:\n${pageErrors.join('\n')}`);
    }
  } catch (error) {
    failure = error;
  } finally {
    if (page) {
      mkdirSync(dirname(screenshotPath), { recursive: true });
      await page.screenshot({ path: screenshotPath, fullPage: true }).catch((error) => {
        console.error(`could not take the screenshot: ${error.message}`);
      });
    }
    await context?.close().catch(() => {});
    rmSync(userDataDir, { recursive: true, force: true });
    await server.stop();
  }
  if (blocked.length > 0) {
    console.error(`FAIL ${blocked.length} request(s) to other hosts were attempted (and blocked):`);
    for (const url of blocked) console.error(`  ${url}`);
    failure ??= new Error('the playground tried to reach other hosts');
  } else {
    pass('no request to any host but the gateway');
  }
  if (failure) {
    console.error(`FAIL ${failure.message}`);
  }
  console.log(`${checks.length} passed, ${failure ? 1 : 0} failed`);
  console.log(`screenshot: ${screenshotPath}`);
  process.exit(failure ? 1 : 0);
}

/** The text of the CodeMirror editor inside `selector`. */
function editorValue(page, selector) {
  return page.evaluate((selector) => {
    const element = document.querySelector(`${selector} .CodeMirror`);
    return element ? element.CodeMirror.getValue() : '';
  }, selector);
}

/** Replaces the query editor's text, then lets GraphiQL re-parse it (it does so debounced). */
async function setQuery(page, query) {
  await page.evaluate((query) => {
    document.querySelector('.graphiql-query-editor .CodeMirror').CodeMirror.setValue(query);
  }, query);
  await page.waitForTimeout(500);
}

/** Waits until the result pane's text satisfies `accept`, and returns it. */
async function waitForResult(page, accept) {
  let text = '';
  const deadline = Date.now() + STEP_TIMEOUT_MS;
  while (Date.now() < deadline) {
    text = await editorValue(page, '.graphiql-response');
    if (accept(text)) return text;
    await page.waitForTimeout(100);
  }
  throw new Error(`the result pane never showed the expected answer; it shows: ${JSON.stringify(text)}`);
}

async function waitUntil(condition, message) {
  const deadline = Date.now() + STEP_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (condition()) return;
    await new Promise((done) => setTimeout(done, 100));
  }
  throw new Error(message);
}

main().catch((error) => {
  console.error(`FAIL ${error.stack || error}`);
  process.exit(1);
});
