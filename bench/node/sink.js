'use strict';
// node's smtp-server as a discarding, counting sink for the mailstorm bench.
//
//   node bench/node/sink.js --check                        print the smtp-server version
//   node bench/node/sink.js PORT [BACKLOG] [MAX_CLIENTS]   serve on 127.0.0.1:PORT
//
// Prints "listening 127.0.0.1:PORT" when ready and "messages N" on SIGTERM/SIGINT.
// Reverse DNS is off and the name is fixed (no DNS). smtp-server's built-in 100 ms
// early-talker delay before each greeting is left as shipped.
// Install the package with: npm install --prefix bench/node

const fs = require('fs');
const path = require('path');

let SMTPServer;
try {
    ({ SMTPServer } = require('smtp-server'));
} catch (err) {
    console.error('smtp-server is not installed: ' + err.message.split('\n')[0]);
    process.exit(3);
}

function packageVersion() {
    let dir = path.dirname(require.resolve('smtp-server'));
    while (dir !== path.dirname(dir)) {
        const file = path.join(dir, 'package.json');
        if (fs.existsSync(file)) {
            const pkg = JSON.parse(fs.readFileSync(file, 'utf8'));
            if (pkg.name === 'smtp-server') {
                return pkg.version;
            }
        }
        dir = path.dirname(dir);
    }
    return 'unknown';
}

if (process.argv[2] === '--check') {
    console.log(packageVersion());
    process.exit(0);
}

const port = Number(process.argv[2]);
const backlog = Number(process.argv[3] || 4096);
const maxClients = Number(process.argv[4] || 20000);
let messages = 0;

const server = new SMTPServer({
    name: 'bench.sink',
    banner: 'node smtp-server bench sink',
    logger: false,
    disableReverseLookup: true,
    authOptional: true,
    disabledCommands: ['AUTH', 'STARTTLS'],
    maxClients,
    onData(stream, session, callback) {
        stream.on('data', () => {});
        stream.on('end', () => {
            messages += 1;
            callback();
        });
    }
});

server.on('error', (err) => console.error('server error: ' + err.message));

function stop() {
    process.stdout.write('messages ' + messages + '\n', () => process.exit(0));
}

process.on('SIGTERM', stop);
process.on('SIGINT', stop);

server.listen(port, '127.0.0.1', backlog, () => {
    console.log('listening 127.0.0.1:' + port);
});
