// Reference peer on uWebSockets.js: groups are uWS topics, delivery is app.publish.
// `node uws-server.js PORT --tls CERT KEY` serves wss:// with uWS's SSLApp instead.
'use strict';
const uWS = require(process.env.UWS_MODULE || 'uwebsockets');
const { parse, portArg, tlsArgs } = require('./protocol');

const port = portArg();
const tls = tlsArgs();
const app = tls ? uWS.SSLApp({ cert_file_name: tls.cert, key_file_name: tls.key }) : uWS.App();

app.ws('/*', {
  compression: uWS.DISABLED,
  maxPayloadLength: 16 * 1024 * 1024,
  // uWS silently skips publishing to a subscriber past maxBackpressure; keep it large
  // so the benchmark measures speed, and the loader's loss counter catches any drop.
  maxBackpressure: 64 * 1024 * 1024,
  idleTimeout: 0,
  message: (ws, message, isBinary) => {
    if (isBinary) {
      ws.send(JSON.stringify({ error: 'binary_frame', detail: 'only text frames are accepted' }), false);
      return;
    }
    const c = parse(Buffer.from(message).toString());
    if (c.errorFrame) {
      ws.send(c.errorFrame, false);
      return;
    }
    if (c.cmd === 'add_group') ws.subscribe(c.group);
    else if (c.cmd === 'leave_group') ws.unsubscribe(c.group);
    else app.publish(c.group, c.message, false);
    if (c.reply) ws.send(c.reply, false);
  },
});

app.listen('127.0.0.1', port, (token) => {
  if (!token) {
    console.error(`uws peer: cannot listen on 127.0.0.1:${port}`);
    process.exit(1);
  }
  console.log(`uws peer listening on 127.0.0.1:${port}${tls ? ' (TLS, SSLApp)' : ''}`);
});
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
