// Shared protocol logic for the reference peers: parse one command frame and
// normalise it, so both servers answer exactly alike.
'use strict';

/** Group key: a JSON string as-is, an integer as its decimal text (123 == "123"). */
function groupKey(v) {
  if (typeof v === 'string' && v.length > 0) return v;
  if (typeof v === 'number' && Number.isInteger(v)) return String(v);
  return null;
}

function error(code, detail, id) {
  const e = { error: code, detail };
  if (id !== undefined) e.id = id;
  return JSON.stringify(e);
}

/**
 * Parse a text frame. Returns {cmd, group, message, reply} on success, where
 * `reply` is the text to send back (or null), or {errorFrame} on bad input.
 */
function parse(text) {
  let obj;
  try {
    obj = JSON.parse(text);
  } catch (e) {
    return { errorFrame: error('bad_json', 'frame is not valid JSON') };
  }
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) {
    return { errorFrame: error('bad_command', 'frame must be a JSON object') };
  }
  const id = obj.id;
  const group = groupKey(obj.group_id);
  if (group === null) return { errorFrame: error('bad_group_id', 'group_id must be a string or an integer', id) };
  const reply = id !== undefined ? JSON.stringify({ id, ok: true }) : null;
  switch (obj.cmd) {
    case 'add_group':
    case 'leave_group':
      return { cmd: obj.cmd, group, reply };
    case 'send_to_group': {
      if (!('message' in obj)) return { errorFrame: error('bad_message', 'message is missing', id) };
      const m = obj.message;
      return { cmd: obj.cmd, group, message: typeof m === 'string' ? m : JSON.stringify(m), reply };
    }
    default:
      return { errorFrame: error('unknown_cmd', `unknown cmd ${JSON.stringify(obj.cmd)}`, id) };
  }
}

function usage() {
  console.error(`usage: node ${process.argv[1]} PORT [--tls CERT_PEM KEY_PEM]`);
  process.exit(64);
}

function portArg() {
  const port = Number(process.argv[2]);
  if (!Number.isInteger(port) || port <= 0 || port > 65535) usage();
  return port;
}

/** `--tls CERT KEY` after the port: the PEM files to serve wss:// with; null without it. */
function tlsArgs() {
  const rest = process.argv.slice(3);
  if (rest.length === 0) return null;
  if (rest[0] !== '--tls' || rest.length !== 3) usage();
  const fs = require('fs');
  for (const f of rest.slice(1)) {
    if (!fs.existsSync(f)) {
      console.error(`no such file: ${f}`);
      process.exit(66);
    }
  }
  return { cert: rest[1], key: rest[2] };
}

module.exports = { parse, portArg, tlsArgs };
