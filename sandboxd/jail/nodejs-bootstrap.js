// sandboxd's Node.js bootstrap: the only code a Node worker holds before its request.
//
// The worker exec'd `node` with this file after every confinement step, seccomp
// included: nothing here runs with more rights than the user's code will.  It waits for
// one request on fd 3 (a 4-byte big-endian length, then JSON: code, input files in
// base64, environment, argv), writes the files into /work, sets the environment, tells
// the supervisor on fd 4 (the link) that setup is over ("S"), closes fd 3 and runs the
// code as the CommonJS main module /work/main.js.  This module leaves the module cache
// before that, and what it knows lives only in its closure.  The link stays: at exit the
// bootstrap says "D" and the status on it (code can write there too, and mislead only its
// own verdict).
'use strict';

const fs = require('fs');
const Module = require('module');
const path = require('path');

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

function writeFiles(files) {
  for (const [name, data] of Object.entries(files)) {
    const parts = name.split('/');
    if (name.startsWith('/') || name.includes('\0') || parts.some((p) => p === '' || p === '.' || p === '..')) {
      throw new Error(`bad file name ${JSON.stringify(name)}`);
    }
    if (parts.length > 1) fs.mkdirSync(path.dirname(name), { recursive: true, mode: 0o755 });
    const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW } = fs.constants;
    const fd = fs.openSync(name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o644);
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
  writeFiles(request.files || {});
  Object.assign(process.env, request.env || {}); // on top of the fresh one node was started with
  process.argv = [process.argv[0], MAIN, ...(request.argv || []).slice(1)];
  fs.writeSync(LINK_FD, 'S'); // setup is over: what follows is the user's
  fs.closeSync(REQUEST_FD);
  return request.code;
}

const code = release();
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
// Then the supervisor ends the process at once: node's own teardown takes longer than a
// short run.  (After a crash, or if the code removes this listener, it is waited for.)
process.on('exit', (status) => {
  if (crashed) return;
  try {
    fs.writeSync(LINK_FD, `D${status & 255}`);
  } catch (e) {
    // the link is the run's to close
  }
});
