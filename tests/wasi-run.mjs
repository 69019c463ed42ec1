// Runs a wasm32-wasip1 test binary under Node's WASI (cargo's target runner for `make test-wasm`),
// so the host-free core is also tested where usize is 32 bits.
import { readFile } from "node:fs/promises";
import { WASI } from "node:wasi";
import process from "node:process";

const [file, ...args] = process.argv.slice(2);
const wasi = new WASI({
  version: "preview1",
  args: [file, ...args],
  env: process.env,
  preopens: { "/": "/" },
  returnOnExit: true,
});
const module = await WebAssembly.compile(await readFile(file));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
// Exit at once with the tests' status: Node once died of SIGSEGV in its teardown after every test
// had passed (2026-12-07, 1 run in 5); nothing after the tests needs the VM.
process.exit(wasi.start(instance));
