// Runs graphql-http's server audits (the GraphQL over HTTP specification's MUST, SHOULD and MAY
// rules) against the gateway's /graphql, as the demo practitioner. Prints every audit with its
// result; exits 1 when any MUST fails. SHOULD and MAY failures are counted and listed only.
//
//   node audit.mjs                      # starts target/debug/smd-gateway in dev mode itself
//   GATEWAY_URL=http://127.0.0.1:8080 GATEWAY_TOKEN=eyJ… node audit.mjs

import { serverAudits } from 'graphql-http';

import { gateway } from '../node-support/gateway.mjs';

const server = await gateway();
let mustFailures = 0;
let shouldFailures = 0;
let mayFailures = 0;
let passed = 0;
try {
  // Every audit request carries the demo practitioner's token, as a real client's would.
  const fetchWithToken = (input, init = {}) => {
    const headers = new Headers(init.headers);
    headers.set('authorization', `Bearer ${server.token}`);
    return fetch(input, { ...init, headers });
  };
  const audits = serverAudits({ url: `${server.url}/graphql`, fetchFn: fetchWithToken });
  for (const audit of audits) {
    const result = await audit.fn();
    if (result.status === 'ok') {
      passed += 1;
      console.log(`ok     ${audit.name}`);
      continue;
    }
    // error: a MUST failed; warn: a SHOULD; notice: a MAY.
    const label = { error: 'FAIL', warn: 'warn', notice: 'notice' }[result.status];
    if (result.status === 'error') mustFailures += 1;
    if (result.status === 'warn') shouldFailures += 1;
    if (result.status === 'notice') mayFailures += 1;
    console.log(`${label.padEnd(6)} ${audit.name}\n         ${String(result.reason).replaceAll('\n', '\n         ')}`);
    // Free the connection the failed audit kept for inspection.
    await result.response?.body?.cancel?.().catch(() => {});
  }
} finally {
  await server.stop();
}
console.log(
  `graphql-http audit: ${passed} ok, ${mustFailures} MUST failed, ${shouldFailures} SHOULD failed, ${mayFailures} MAY failed`,
);
console.log(`${passed} passed, ${mustFailures} failed`);
process.exit(mustFailures > 0 ? 1 : 0);
