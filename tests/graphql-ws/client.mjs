// Talks to the gateway's /graphql/ws with the reference graphql-transport-ws client (the npm
// `graphql-ws` package, `ws` as its WebSocket), the way a frontend would:
//
// 1. as the demo practitioner, subscribes to `messageStatusChanged`, runs queries and mutations
//    over the same socket to send a secure message, and sees the subscription report it;
// 2. an invalid document gets the protocol's `error` message, each error with extensions.code;
// 3. a bad token in connection_init closes the socket with 4403.
//
// Exits 1 on any failure.
//
//   node client.mjs                      # starts target/debug/smd-gateway in dev mode itself
//   GATEWAY_URL=http://127.0.0.1:8080 GATEWAY_TOKEN=eyJ… node client.mjs

import { createClient } from 'graphql-ws';
import WebSocket from 'ws';

import { gateway } from '../node-support/gateway.mjs';

const TIMEOUT_MS = 30_000;
let passed = 0;
let failed = 0;

function check(what, condition, detail) {
  if (condition) {
    passed += 1;
    console.log(`ok   ${what}`);
  } else {
    failed += 1;
    console.log(`FAIL ${what}${detail === undefined ? '' : `: ${JSON.stringify(detail)}`}`);
  }
}

// One socket for the client's life, as a frontend keeps it (a lazy client closes the socket
// whenever no operation is open). No retries: a refusal must reach the check that caused it.
function client(url, authorization, onConnectionError, onClosed) {
  return createClient({
    url,
    webSocketImpl: WebSocket,
    connectionParams: { Authorization: authorization },
    retryAttempts: 0,
    lazy: false,
    onNonLazyError: onConnectionError ?? (() => {}),
    on: { closed: onClosed ?? (() => {}) },
  });
}

/**
 * One query or mutation: { result } once the server completes it, { error } for `error` or a
 * close. It waits for the server's `complete` rather than unsubscribing at the first `next`:
 * the client would then send its own `complete`, and when the server's `next` and `complete`
 * arrive in one read it releases the operation twice and closes the shared socket.
 */
function once(wsClient, payload) {
  return new Promise((resolve) => {
    let result;
    const timer = setTimeout(() => resolve({ error: 'timed out' }), TIMEOUT_MS);
    wsClient.subscribe(payload, {
      next: (value) => (result = value),
      error: (error) => {
        clearTimeout(timer);
        resolve({ error });
      },
      complete: () => {
        clearTimeout(timer);
        resolve(result ? { result } : { error: 'completed without a result' });
      },
    });
  });
}

/** Runs a query or mutation over the socket and returns its data, throwing on GraphQL errors. */
async function run(wsClient, query, variables = {}) {
  const { result, error } = await once(wsClient, { query, variables });
  if (error) throw new Error(`${query.trim().split('\n')[0]} failed: ${describe(error)}`);
  if (result.errors?.length) {
    throw new Error(`${query.trim().split('\n')[0]} answered errors: ${JSON.stringify(result.errors)}`);
  }
  return result.data;
}

function describe(error) {
  if (error && typeof error === 'object' && 'code' in error && 'reason' in error) {
    return `closed ${error.code} ${error.reason}`;
  }
  return error instanceof Error ? error.message : JSON.stringify(error);
}

const server = await gateway();
const url = `${server.wsUrl}/graphql/ws`;
let practitionerClosed;
const closedCleanly = new Promise((resolve) => (practitionerClosed = resolve));
const practitioner = client(url, `Bearer ${server.token}`, undefined, (event) => practitionerClosed(event));
try {
  // A query over the socket.
  const me = await run(practitioner, '{ me { id name role } }');
  check('a query over the socket answers as dr-chen', me.me?.id === 'dr-chen' && me.me?.role === 'PRACTITIONER', me);

  // An invalid document: the protocol's `error` message, every error with a code.
  const invalid = await once(practitioner, { query: '{ me { noSuchField } }' });
  check(
    'an invalid document gets an `error` message whose errors carry extensions.code',
    Array.isArray(invalid.error) &&
      invalid.error.length > 0 &&
      invalid.error.every((error) => typeof error.extensions?.code === 'string'),
    invalid.error ?? invalid.result,
  );
  const unparsable = await once(practitioner, { query: '{ me { id ' });
  check(
    'an unparsable document gets an `error` message whose errors carry extensions.code',
    Array.isArray(unparsable.error) &&
      unparsable.error.every((error) => typeof error.extensions?.code === 'string'),
    unparsable.error ?? unparsable.result,
  );

  // Subscribe first, then send a message over the same socket; the subscription must report it.
  const statuses = [];
  let subscriptionError;
  const stopSubscription = practitioner.subscribe(
    { query: 'subscription { messageStatusChanged { id status } }' },
    {
      next: (result) => {
        if (result.errors?.length) subscriptionError = result.errors;
        else statuses.push(result.data.messageStatusChanged);
      },
      error: (error) => (subscriptionError = error),
      complete: () => (subscriptionError ??= 'completed early'),
    },
  );
  const unique = `${Date.now()}`.slice(-6);
  await run(
    practitioner,
    `mutation { linkArgus(input: { username: "demo.argus", password: "argus-sandbox-pw" }) { status } }`,
  );
  await run(practitioner, 'mutation { setMyHpii(hpii: "8003610000000006") }');
  const packs = await run(practitioner, '{ creditPacks { id credits } }');
  const card = await run(practitioner, '{ paymentMethod { display } }');
  if (!card.paymentMethod) {
    await run(practitioner, 'mutation { setPaymentMethod(input: { token: "pm_sandbox_approve" }) { display } }');
  }
  await run(
    practitioner,
    `mutation($key: String!, $pack: ID!) { purchaseCredits(input: { packId: $pack, idempotencyKey: $key }) { balance } }`,
    { key: crypto.randomUUID(), pack: packs.creditPacks[0].id },
  );
  const patient = await run(
    practitioner,
    `mutation { createPatient(input: { givenName: "Ada", familyName: "Check${unique}", dateOfBirth: "1961-03-04" }) { id } }`,
  );
  const note = await run(
    practitioner,
    `mutation($patient: ID!) { createClinicalNote(input: { patientId: $patient, title: "WebSocket check",
       sections: [{ key: "history", title: "History", body: "Sent by tests/graphql-ws" }] }) { id } }`,
    { patient: patient.createPatient.id },
  );
  const directory = await run(
    practitioner,
    '{ searchPractitioners(query: "cardiology", first: 10) { edges { node { id providers } } } }',
  );
  const recipient = directory.searchPractitioners.edges
    .map((edge) => edge.node)
    .find((node) => node.providers.includes('ARGUS'));
  if (!recipient) throw new Error(`no cardiologist on Argus in the sandbox directory: ${JSON.stringify(directory)}`);
  const sent = await run(
    practitioner,
    `mutation($note: ID!, $recipient: ID!, $key: String!) {
       sendSecureMessage(input: { noteId: $note, sectionKeys: ["history"], recipientId: $recipient,
         idempotencyKey: $key, provider: ARGUS }) { message { id status } } }`,
    { note: note.createClinicalNote.id, recipient: recipient.id, key: crypto.randomUUID() },
  );
  const messageId = sent.sendSecureMessage.message.id;
  check('mutations over the socket send a secure message', Boolean(messageId), sent);
  const deadline = Date.now() + TIMEOUT_MS;
  while (Date.now() < deadline && !subscriptionError && !statuses.some((status) => status.id === messageId)) {
    await new Promise((done) => setTimeout(done, 100));
  }
  stopSubscription();
  const seen = statuses.filter((status) => status.id === messageId).map((status) => status.status);
  check(
    'messageStatusChanged reports the sent message',
    !subscriptionError && seen.length > 0,
    subscriptionError ?? statuses,
  );
  console.log(`     statuses seen: ${seen.join(' → ')}`);

  // A bad token: the gateway refuses the connection with 4403.
  let strangerClosed;
  const closed = new Promise((resolve) => (strangerClosed = resolve));
  const stranger = client(url, 'Bearer not-a-real-token', (closeEvent) => strangerClosed(closeEvent));
  const refused = await Promise.race([
    closed,
    new Promise((resolve) => setTimeout(() => resolve('no close within the timeout'), TIMEOUT_MS)),
  ]);
  check(
    'a bad token in connection_init closes the socket with 4403',
    refused?.code === 4403,
    describe(refused),
  );
  await stranger.dispose();

  // Leaving: the client closes with 1000 and the server must answer the close frame, or the
  // client sees an abnormal closure (1006).
  await practitioner.dispose();
  const closing = await Promise.race([
    closedCleanly,
    new Promise((resolve) => setTimeout(() => resolve('no close within the timeout'), TIMEOUT_MS)),
  ]);
  check('closing the socket is answered with 1000, not dropped (1006)', closing?.code === 1000, describe(closing));
} catch (error) {
  failed += 1;
  console.log(`FAIL ${error.message}`);
} finally {
  await practitioner.dispose();
  await server.stop();
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 ? 1 : 0);
