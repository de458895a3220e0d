// Reference peer on the `ws` package: same protocol as groupcast, one process.
'use strict';
const { WebSocketServer } = require('ws');
const { parse, portArg } = require('./protocol');

const port = portArg();
const groups = new Map(); // group key -> Set<WebSocket>

const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false, clientTracking: false });

wss.on('connection', (ws) => {
  const mine = new Set();
  ws.on('message', (data, isBinary) => {
    if (isBinary) {
      ws.send(JSON.stringify({ error: 'binary_frame', detail: 'only text frames are accepted' }));
      return;
    }
    const c = parse(data.toString());
    if (c.errorFrame) {
      ws.send(c.errorFrame);
      return;
    }
    if (c.cmd === 'add_group') {
      let set = groups.get(c.group);
      if (!set) groups.set(c.group, (set = new Set()));
      set.add(ws);
      mine.add(c.group);
    } else if (c.cmd === 'leave_group') {
      leave(ws, c.group);
      mine.delete(c.group);
    } else {
      const set = groups.get(c.group);
      if (set) {
        const buf = Buffer.from(c.message); // encode once, send to every member
        for (const member of set) member.send(buf, { binary: false });
      }
    }
    if (c.reply) ws.send(c.reply);
  });
  ws.on('close', () => {
    for (const g of mine) leave(ws, g);
  });
  ws.on('error', () => {});
});

function leave(ws, group) {
  const set = groups.get(group);
  if (!set) return;
  set.delete(ws);
  if (set.size === 0) groups.delete(group);
}

wss.on('listening', () => console.log(`ws peer listening on 127.0.0.1:${port}`));
wss.on('error', (e) => {
  console.error(`ws peer: ${e.message}`);
  process.exit(1);
});
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
