// sandboxd's Node.js bootstrap: the only code a Node worker holds before its request.
//
// The worker exec'd `node` with this file after every confinement step, seccomp
// included: nothing here runs with more rights than the user's code will.  It waits for
// one request on fd 3 (a 4-byte big-endian length, then JSON: code, input files in
// base64, environment, argv), writes the files into /work, sets the environment, tells
// the daemon on fd 4 (the link) that setup is over ("S"), closes fd 3 and runs the
// code as the CommonJS main module /work/main.js.  This module leaves the module cache
// before that, and what it knows lives only in its closure.  The link stays: at exit the
// bootstrap says "D" and the status on it (code can write there too, and mislead only its
// own verdict).
//
// A session (request.session) instead says "O" and serves cells from fd 3 until it
// closes: each a length and JSON (code, files), run in this one context with
// vm.runInThisContext (globals and top-level declarations persist, the completion value
// is the cell's value, a returned promise is awaited), reported on the link as "C" and
// JSON.  SIGINT (session_interrupt) interrupts the running cell; between cells, and for
// errors thrown later by timers, the session goes on, as node's REPL does.
'use strict';

const fs = require('fs');
const Module = require('module');
const net = require('net');
const path = require('path');
const util = require('util');
const vm = require('vm');

const REQUEST_FD = 3;
const LINK_FD = 4;
const MAIN = '/work/main.js';

function readExact(n) {
  const buf = Buffer.alloc(n);
  let off = 0;
  while (off < n) {
    const got = fs.readSync(REQUEST_FD, buf, off, n - off, null);
    if (got === 0) return null;
    off += got;
  }
  return buf;
}

function writeFiles(files, replace) {
  for (const [name, data] of Object.entries(files)) {
    const parts = name.split('/');
    if (name.startsWith('/') || name.includes('\0') || parts.some((p) => p === '' || p === '.' || p === '..')) {
      throw new Error(`bad file name ${JSON.stringify(name)}`);
    }
    if (parts.length > 1) fs.mkdirSync(path.dirname(name), { recursive: true, mode: 0o755 });
    const { O_WRONLY, O_CREAT, O_EXCL, O_TRUNC, O_NOFOLLOW } = fs.constants;
    const fd = fs.openSync(name, O_WRONLY | O_CREAT | (replace ? O_TRUNC : O_EXCL) | O_NOFOLLOW, 0o644);
    try {
      fs.writeSync(fd, Buffer.from(data, 'base64'));
    } finally {
      fs.closeSync(fd);
    }
  }
}

function release() {
  // The streams and the compiler are made now, off the run's clock (no user input yet).
  // Writes to the run's pipes block, as a C program's would: a flood then waits for the
  // daemon (which stops it at its cap) instead of queueing up in memory.
  for (const stream of [process.stdout, process.stderr]) {
    if (stream._handle && typeof stream._handle.setBlocking === 'function') stream._handle.setBlocking(true);
  }
  new Module('/work/warm-up.js', null)._compile('void 0', '/work/warm-up.js');
  fs.writeSync(LINK_FD, 'W'); // started and waiting: the worker is ready
  const header = readExact(4);
  if (header === null) process.exit(0); // retired unused
  const body = readExact(header.readUInt32BE(0));
  if (body === null) throw new Error('the request ended early');
  const request = JSON.parse(body.toString('utf8'));
  writeFiles(request.files || {}, false);
  Object.assign(process.env, request.env || {}); // on top of the fresh one node was started with
  process.argv = [process.argv[0], MAIN, ...(request.argv || []).slice(1)];
  fs.writeSync(LINK_FD, 'S'); // setup is over: what follows is the user's
  if (request.session) return { session: true };
  fs.closeSync(REQUEST_FD);
  return { code: request.code };
}

const MAX_TEXT = 16384; // bytes of a value or a stack in a cell's report

function clip(text, end) {
  const buf = Buffer.from(String(text), 'utf8');
  if (buf.length <= MAX_TEXT) return String(text);
  return end ? '...' + buf.subarray(buf.length - MAX_TEXT).toString('utf8')
    : buf.subarray(0, MAX_TEXT).toString('utf8') + '...';
}

function userStack(err) {
  // The cell's frames only: from the first of the vm module's or this file's on, it is ours.
  if (!(err instanceof Error) || typeof err.stack !== 'string') return `Uncaught ${util.inspect(err)}`;
  const lines = err.stack.split('\n');
  const ours = lines.findIndex((line, i) => i > 0 && (line.includes('(node:vm:') || line.includes(__filename)));
  return (ours > 0 ? lines.slice(0, ours) : lines).join('\n');
}

function describeError(err, interrupted) {
  const isError = err instanceof Error;
  const report = {
    exception: isError ? (err.constructor && err.constructor.name) || err.name || 'Error' : 'Error',
    message: clip(isError ? err.message : `uncaught ${util.inspect(err)}`, false).slice(0, 4000),
    traceback: clip(userStack(err), true),
  };
  if (interrupted) report.interrupted = true;
  return report;
}

function serveCells() {
  // Globals a script in this context gets, as a main module has them.
  globalThis.require = Module.createRequire(MAIN);
  globalThis.module = new Module(MAIN, null);
  globalThis.__filename = MAIN;
  globalThis.__dirname = path.dirname(MAIN);
  let interrupt = null; // while a cell waits for a promise: how to stop waiting
  process.on('SIGINT', () => { if (interrupt) interrupt(); });
  // Errors of timers and promises after their cell: printed, and the session goes on.
  process.on('uncaughtException', (err) => { process.stderr.write(`Uncaught ${util.inspect(err)}\n`); });
  process.on('unhandledRejection', (err) => { process.stderr.write(`Unhandled rejection ${util.inspect(err)}\n`); });
  let seq = 0;
  async function run(cell) {
    seq += 1;
    const report = {};
    try {
      writeFiles(cell.files || {}, true);
      const filename = `<cell ${seq}>`;
      let value;
      try {
        value = vm.runInThisContext(cell.code, { filename, breakOnSigint: true });
      } catch (err) {
        if (!(err instanceof SyntaxError) || !/await is only valid/.test(err.message)) throw err;
        // top-level await: run it as an async function (its declarations stay local to the cell)
        value = vm.runInThisContext(`(async () => {\n${cell.code}\n})()`, { filename, breakOnSigint: true });
      }
      if (value && typeof value.then === 'function') {
        value = await new Promise((resolve, reject) => {
          interrupt = () => { const e = new Error('Script execution interrupted.'); e.code = 'ERR_SCRIPT_EXECUTION_INTERRUPTED'; reject(e); };
          value.then(resolve, reject);
        });
      }
      if (value !== undefined) report.value = clip(util.inspect(value), false);
    } catch (err) {
      const interrupted = err && err.code === 'ERR_SCRIPT_EXECUTION_INTERRUPTED';
      process.stderr.write(`${userStack(err)}\n`);
      Object.assign(report, describeError(err, interrupted));
    } finally {
      interrupt = null;
    }
    fs.writeSync(LINK_FD, 'C' + JSON.stringify(report));
  }
  const input = new net.Socket({ fd: REQUEST_FD, readable: true, writable: false });
  let pending = Buffer.alloc(0);
  let queue = Promise.resolve();
  input.on('data', (chunk) => {
    pending = Buffer.concat([pending, chunk]);
    while (pending.length >= 4 && pending.length >= 4 + pending.readUInt32BE(0)) {
      const body = pending.subarray(4, 4 + pending.readUInt32BE(0));
      pending = pending.subarray(4 + body.length);
      const cell = JSON.parse(body.toString('utf8'));
      cell.files = Object.fromEntries(Object.entries(cell.files || {}));
      queue = queue.then(() => run(cell));
    }
  });
  input.on('end', () => queue.then(() => process.exit(0)));
  fs.writeSync(LINK_FD, 'O'); // open: cells may come
}

const released = release();
if (released.session) {
  delete require.cache[__filename];
  serveCells();
  return;
}
const code = released.code;
const main = new Module(MAIN, null);
main.filename = MAIN;
main.id = '.';
main.paths = Module._nodeModulePaths(path.dirname(MAIN));
delete require.cache[__filename];
Module._cache[MAIN] = main;
process.mainModule = main;
let crashed = false; // an uncaught exception (or rejection): node prints it after 'exit'
process.on('uncaughtExceptionMonitor', () => { crashed = true; });
main._compile(code, MAIN);
main.loaded = true;
// Registered after the code's own top level, so its exit listeners run (and print) first.
// Then the daemon ends the worker at once: node's own teardown takes longer than a
// short run.  (After a crash, or if the code removes this listener, it is waited for.)
process.on('exit', (status) => {
  if (crashed) return;
  try {
    fs.writeSync(LINK_FD, `D${status & 255}`);
  } catch (e) {
    // the link is the run's to close
  }
});
