#!/usr/bin/env node
// Reranks documents with the sidecar over gRPC, from the .proto alone (no generated code).
//
//   node rerank.js --target 127.0.0.1:50051 --query "what do cats eat" \
//       --documents '[{"id": "a", "text": "Cats eat meat."}, {"id": "b", "text": "Stocks fell."}]' \
//       [--top-n 5] [--batch-size 2] [--token TOKEN] [--timeout-ms 10000] \
//       [--tls-root-certs ca.pem [--tls-client-cert client.pem --tls-client-key client-key.pem]]
//
// Settings also come from the Python client's variables: RERANK_CLIENT_TOKEN and RERANK_CLIENT_TLS_*.
// With TLS the token rides as call credentials; over plaintext it is plain metadata, so keep plaintext
// tokens to a loopback address.
//
// Prints one JSON object: the Rerank ranking, and the RerankStream batches and final ranking.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.resolve(__dirname, "../../protos/rerank/v1/rerank.proto");

// TLS (mutual when a client certificate is given) with the token as call credentials, or plaintext.
function channelCredentials(tls, token) {
  if (!tls.rootCerts) return grpc.credentials.createInsecure();
  if (Boolean(tls.clientCert) !== Boolean(tls.clientKey)) {
    throw new Error("--tls-client-cert and --tls-client-key go together: set both for mutual TLS");
  }
  const read = (file) => (file ? fs.readFileSync(file) : null);
  const ssl = grpc.credentials.createSsl(read(tls.rootCerts), read(tls.clientKey), read(tls.clientCert));
  if (!token) return ssl;
  const bearer = grpc.credentials.createFromMetadataGenerator((_, callback) => {
    const metadata = new grpc.Metadata();
    metadata.set("authorization", `Bearer ${token}`);
    callback(null, metadata);
  });
  return grpc.credentials.combineChannelCredentials(ssl, bearer);
}

function loadReranker(target, credentials) {
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, // field names exactly as in the .proto: top_n, raw_scores, ...
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const { rerank } = grpc.loadPackageDefinition(definition);
  return new rerank.v1.Reranker(target, credentials);
}

function callOptions(timeoutMs) {
  return { deadline: new Date(Date.now() + timeoutMs) };
}

function metadataFor(token) {
  const metadata = new grpc.Metadata();
  if (token) metadata.set("authorization", `Bearer ${token}`);
  return metadata;
}

function simplify(results) {
  return results.map(({ index, id, score }) => ({ index, id, score }));
}

function rerankOnce(client, request, metadata, timeoutMs) {
  return new Promise((resolve, reject) => {
    client.Rerank(request, metadata, callOptions(timeoutMs), (error, response) => {
      if (error) reject(error);
      else resolve({ results: simplify(response.results), usage: response.usage, model_id: response.model_id });
    });
  });
}

function rerankStream(client, query, options, documents, batchSize, metadata, timeoutMs) {
  return new Promise((resolve, reject) => {
    const call = client.RerankStream(metadata, callOptions(timeoutMs));
    const batches = [];
    let final = null;
    call.on("data", (message) => {
      if (message.kind === "batch_scores") {
        batches.push({ batch: message.batch_scores.batch, results: simplify(message.batch_scores.results) });
      } else {
        final = { results: simplify(message.final.results), usage: message.final.usage };
      }
    });
    call.on("error", reject);
    call.on("end", () => resolve({ batches, final }));
    // The first message carries the query and options; each message after it, one page of documents.
    call.write({ query, ...options, documents: documents.slice(0, batchSize) });
    for (let start = batchSize; start < documents.length; start += batchSize) {
      call.write({ documents: documents.slice(start, start + batchSize) });
    }
    call.end();
  });
}

async function main() {
  const { values } = parseArgs({
    options: {
      target: { type: "string", default: "127.0.0.1:50051" },
      query: { type: "string" },
      documents: { type: "string" },
      "top-n": { type: "string", default: "0" },
      "batch-size": { type: "string", default: "32" },
      token: { type: "string", default: process.env.RERANK_CLIENT_TOKEN || "" },
      "tls-root-certs": { type: "string", default: process.env.RERANK_CLIENT_TLS_ROOT_CERTS || "" },
      "tls-client-cert": { type: "string", default: process.env.RERANK_CLIENT_TLS_CLIENT_CERT || "" },
      "tls-client-key": { type: "string", default: process.env.RERANK_CLIENT_TLS_CLIENT_KEY || "" },
      "timeout-ms": { type: "string", default: "10000" },
    },
  });
  if (!values.query || !values.documents) {
    throw new Error("--query and --documents (a JSON list of {id, text}) are required");
  }
  const documents = JSON.parse(values.documents);
  const options = { top_n: Number(values["top-n"]) };
  const timeoutMs = Number(values["timeout-ms"]);
  const tls = {
    rootCerts: values["tls-root-certs"],
    clientCert: values["tls-client-cert"],
    clientKey: values["tls-client-key"],
  };
  // Over TLS the channel's call credentials carry the token; over plaintext, each call's metadata.
  const metadata = metadataFor(tls.rootCerts ? "" : values.token);
  const client = loadReranker(values.target, channelCredentials(tls, values.token));
  try {
    const rerank = await rerankOnce(client, { query: values.query, documents, ...options }, metadata, timeoutMs);
    const stream = await rerankStream(
      client, values.query, options, documents, Number(values["batch-size"]), metadata, timeoutMs,
    );
    process.stdout.write(`${JSON.stringify({ rerank, stream })}\n`);
  } finally {
    client.close();
  }
}

main().catch((error) => {
  process.stderr.write(`rerank failed: ${error.code !== undefined ? `${grpc.status[error.code]}: ` : ""}${error.details || error.message}\n`);
  process.exitCode = 1;
});
