// A price service's producer in TypeScript: the PriceData shape and Lamport clock of a service that guards its
// events, stamped in ENVELOPE.md's bound form (binary content mode, HMAC-SHA256) and sent with kafkajs.
//
//   node dist/producer.js plan.json
//
// plan.json: {"broker", "topic", "source", "keyId", "secretEnv", "partitioner": "default" | "legacy", "gzip"?: true,
//             "transaction"?: "commit" | "abort",
//             "events": [{"id", "subject", "version", "price", "lamportTime"?, "tamper"?: "checksum"}]}
// Prints one JSON line per event: {"id", "partition", "offset", "instance", "lamportTime"} (where kafkajs put it).
// An event's `lamportTime` replaces the clock's reading (a replayed or reordered clock); `tamper: "checksum"`
// changes one hex digit of its MAC after signing. Both exist to show what the guard refuses. With `transaction`,
// the events are sent in one Kafka transaction, then committed or aborted (offsets are then not printed).

import { createHmac, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { CompressionTypes, Kafka, logLevel, Partitioners } from "kafkajs";

interface PriceData {
  productId: string;
  price: number;
  currency: string;
  lastUpdated: string;
}

interface PlannedEvent {
  id: string;
  subject: string;
  version: number;
  price: number;
  lamportTime?: number;
  tamper?: "checksum";
}

interface Plan {
  broker: string;
  topic: string;
  source: string;
  keyId: string;
  secretEnv: string;
  partitioner?: "default" | "legacy";
  gzip?: boolean;
  transaction?: "commit" | "abort";
  events: PlannedEvent[];
}

// One clock per process under its own instance id, strictly increasing: a hybrid logical clock (ENVELOPE.md,
// "Lamport time"), the wall clock in microseconds or one more than the last reading.
class LamportClock {
  readonly instance = randomBytes(8).toString("hex");
  private counter = 0;

  tick(): number {
    this.counter = Math.max(this.counter + 1, Date.now() * 1000);
    return this.counter;
  }
}

// The bound form's signature base: one `name: value` line per attribute present, in ENVELOPE.md's order, then
// `data: ` and the value bytes as sent.
function signatureBase(attributes: [string, string | undefined][], value: Buffer): Buffer {
  const lines = attributes
    .filter((entry): entry is [string, string] => entry[1] !== undefined)
    .map(([name, v]) => {
      if (v.includes("\n")) throw new Error(`${name} contains a line feed and cannot be signed`);
      return `${name}: ${v}\n`;
    })
    .join("");
  return Buffer.concat([Buffer.from(lines + "data: ", "utf8"), value]);
}

function stamp(plan: Plan, secret: string, clock: LamportClock, event: PlannedEvent) {
  const data: PriceData = {
    productId: event.subject,
    price: event.price,
    currency: "USD",
    lastUpdated: new Date().toISOString(),
  };
  const value = Buffer.from(JSON.stringify(data), "utf8");
  const time = new Date().toISOString();
  const lamport = String(event.lamportTime ?? clock.tick());
  const attributes: [string, string | undefined][] = [
    ["checksumform", "bound"], ["id", event.id], ["source", plan.source], ["type", "price.updated"],
    ["subject", event.subject], ["time", time], ["entityversion", String(event.version)],
    ["lamporttime", lamport], ["lamportinstance", clock.instance], ["vectorclock", undefined],
    ["datacontenttype", "application/json"], ["checksumalg", "hmac-sha256"], ["keyid", plan.keyId],
  ];
  let checksum = createHmac("sha256", secret).update(signatureBase(attributes, value)).digest("hex");
  if (event.tamper === "checksum") {
    checksum = (checksum[0] === "0" ? "1" : "0") + checksum.slice(1);
  }
  return {
    lamport,
    key: event.subject,
    value,
    headers: {
      ce_specversion: "1.0", ce_id: event.id, ce_source: plan.source, ce_type: "price.updated",
      ce_subject: event.subject, ce_time: time, ce_entityversion: String(event.version),
      ce_lamporttime: lamport, ce_lamportinstance: clock.instance, "content-type": "application/json",
      ce_checksumform: "bound", ce_checksumalg: "hmac-sha256", ce_checksum: checksum, ce_keyid: plan.keyId,
    },
  };
}

async function main(): Promise<void> {
  const plan = JSON.parse(readFileSync(process.argv[2], "utf8")) as Plan;
  const secret = process.env[plan.secretEnv];
  if (!secret) throw new Error(`${plan.secretEnv} is not set`);
  const kafka = new Kafka({ clientId: "ts-price-producer", brokers: [plan.broker], logLevel: logLevel.ERROR });
  const createPartitioner = plan.partitioner === "legacy" ? Partitioners.LegacyPartitioner
    : Partitioners.DefaultPartitioner;
  const transactionalId = plan.transaction ? `ts-price-producer-${randomBytes(4).toString("hex")}` : undefined;
  const producer = kafka.producer({ createPartitioner, idempotent: true, maxInFlightRequests: 1, transactionalId });
  const clock = new LamportClock();
  await producer.connect();
  try {
    if (plan.transaction) {
      const transaction = await producer.transaction();
      for (const event of plan.events) {
        const { lamport, ...message } = stamp(plan, secret, clock, event);
        await transaction.send({ topic: plan.topic, messages: [message] });
        console.log(JSON.stringify({ id: event.id, instance: clock.instance, lamportTime: lamport }));
      }
      await (plan.transaction === "commit" ? transaction.commit() : transaction.abort());
      return;
    }
    for (const event of plan.events) {  // one at a time: the order sent is the order in the partition
      const { lamport, ...message } = stamp(plan, secret, clock, event);
      const compression = plan.gzip ? CompressionTypes.GZIP : CompressionTypes.None;
      const [meta] = await producer.send({ topic: plan.topic, acks: -1, compression, messages: [message] });
      console.log(JSON.stringify({ id: event.id, partition: meta.partition, offset: meta.baseOffset,
                                   instance: clock.instance, lamportTime: lamport }));
    }
  } finally {
    await producer.disconnect();
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
