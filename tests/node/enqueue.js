// Enqueue one invoices.create job from Node with celery-node, as the README shows.
// Usage: INVOICE_BROKER_URL=redis://... INVOICE_QUEUE=invoices node enqueue.js '<kwargs JSON>'
// Prints the task id.
const { createClient } = require("celery-node");
const { randomUUID } = require("node:crypto");

async function enqueueInvoice(brokerUrl, queue, kwargs) {
  const client = createClient(brokerUrl, brokerUrl, queue);
  const id = randomUUID();
  const message = client.createTaskMessage(id, "invoices.create", [], kwargs);
  // celery-node sends no argsrepr/kwargsrepr: add them, masked, for Flower and the logs.
  const shown = { ...kwargs, request: { ...kwargs.request, email_user: "***" } };
  Object.assign(message.headers, { argsrepr: "()", kwargsrepr: JSON.stringify(shown) });
  await client.isReady();
  // client.sendTask would do, but returns before the push: await it instead.
  await client.broker.publish(message.body, "", queue, message.headers, message.properties);
  await client.disconnect();
  return id;
}

if (require.main === module) {
  const kwargs = JSON.parse(process.argv[2]);
  enqueueInvoice(process.env.INVOICE_BROKER_URL, process.env.INVOICE_QUEUE, kwargs).then(
    (id) => console.log(id),
    (err) => {
      console.error(err.message);
      process.exit(1);
    },
  );
}

module.exports = { enqueueInvoice };
