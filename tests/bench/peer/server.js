// The peer for paybus's benchmark: @supabase/stripe-sync-engine's webhook route on a plain node:http server.
//
// Upstream's Fastify app does the same per request: read the raw body, `processWebhook(raw, signature)`
// (verify with stripe-node, then upsert data.object into its `stripe` schema inline), answer
// {received: true}. A bare node:http server is the cheapest possible wrapper, so any framework cost is
// left out in the peer's favour. Environment: DATABASE_URL, STRIPE_WEBHOOK_SECRET, PORT, PEER_POOL_MAX.
// CommonJS on purpose: the package's ESM build refers to __dirname in runMigrations and fails there.
const http = require('node:http')
const { StripeSync, runMigrations } = require('@supabase/stripe-sync-engine')

const databaseUrl = process.env.DATABASE_URL
const secret = process.env.STRIPE_WEBHOOK_SECRET
const port = Number(process.env.PORT || 8099)
if (!databaseUrl || !secret) {
  console.error('DATABASE_URL and STRIPE_WEBHOOK_SECRET are required')
  process.exit(2)
}

async function main() {
  // runMigrations logs a failure and returns; a logger makes it visible
  const logger = { info: () => {}, debug: () => {}, warn: console.warn, error: console.error }
  await runMigrations({ databaseUrl, schema: 'stripe', logger })
  const sync = new StripeSync({
    poolConfig: { connectionString: databaseUrl, max: Number(process.env.PEER_POOL_MAX || 10) },
    schema: 'stripe',
    stripeSecretKey: 'sk_test_bench_never_called',
    stripeWebhookSecret: secret,
    backfillRelatedEntities: false,
  })

  let failures = 0
  function answer(res, status, body) {
    const text = JSON.stringify(body)
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
    res.end(text)
  }

  const server = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/healthz') return answer(res, 200, { status: 'ok' })
    if (req.method !== 'POST' || req.url !== '/webhooks') return answer(res, 404, { error: 'not found' })
    const chunks = []
    req.on('data', (chunk) => chunks.push(chunk))
    req.on('end', () => {
      sync
        .processWebhook(Buffer.concat(chunks), req.headers['stripe-signature'])
        .then(() => answer(res, 200, { received: true }))
        .catch((err) => {
          if (failures++ < 5) console.error('webhook failed:', String(err && err.message).slice(0, 300))
          answer(res, 400, { error: String(err && err.message).slice(0, 200) })
        })
    })
  })
  server.keepAliveTimeout = 65_000
  server.listen(port, '127.0.0.1', () => console.log(`peer listening on 127.0.0.1:${port}`))

  for (const sig of ['SIGTERM', 'SIGINT']) {
    process.on(sig, () => {
      server.close(() => process.exit(0))
      server.closeAllConnections()
    })
  }
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
