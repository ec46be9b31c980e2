// A Node.js MCP server's side of the sessionq wire contract (docs/wire-contract.md):
// build the Dramatiq message for `save_session` and push it onto the Redis queue.
//
//   REDIS_URL=redis://127.0.0.1:6379/0 node enqueue_save.mjs SESSION_ID
//
// Prints {"message_id": ..., "redis_message_id": ...} on success.
import { randomUUID } from "node:crypto";
import { createClient } from "redis";

const NAMESPACE = "dramatiq";

/** The Dramatiq message envelope every sessionq job uses. */
function dramatiqMessage(queueName, actorName, payload) {
  const redisMessageId = randomUUID();
  return {
    redisMessageId,
    message: {
      queue_name: queueName,
      actor_name: actorName,
      args: [payload],
      kwargs: {},
      options: { redis_message_id: redisMessageId },
      message_id: randomUUID(),
      message_timestamp: Date.now(),
    },
  };
}

/** HSET the message under its Redis id, then RPUSH the id onto the queue, atomically. */
async function enqueue(client, queueName, actorName, payload) {
  const { redisMessageId, message } = dramatiqMessage(queueName, actorName, payload);
  await client
    .multi()
    .hSet(`${NAMESPACE}:${queueName}.msgs`, redisMessageId, JSON.stringify(message))
    .rPush(`${NAMESPACE}:${queueName}`, redisMessageId)
    .exec();
  return { message_id: message.message_id, redis_message_id: redisMessageId };
}

const sessionId = process.argv[2] ?? `node-${randomUUID()}`;
const now = new Date();
const at = (seconds) => new Date(now.getTime() + seconds * 1000).toISOString();
const payload = {
  session_id: sessionId,
  model: "node-model",
  created_at: at(0),
  updated_at: at(1),
  status: "active",
  metadata: { producer: "node", transport: "streamable-http" },
  messages: [
    { message_id: "m1", role: "user", content: "Hello from Node.js ✓", created_at: at(0) },
    { message_id: "m2", role: "assistant", content: "Persisted by a Python worker.", created_at: at(1) },
  ],
};

const client = createClient({ url: process.env.REDIS_URL ?? "redis://127.0.0.1:6379/0" });
client.on("error", (err) => {
  console.error(`redis error: ${err.message}`);
  process.exit(1);
});
await client.connect();
try {
  console.log(JSON.stringify(await enqueue(client, "sessions", "save_session", payload)));
} finally {
  await client.quit();
}
