// A development stand-in for the dashboard routes of `kloigos serve`: serves web/ at `/` and
// `/assets/app.{js,css}` straight from the working tree (no rebuild needed after an edit) and
// forwards everything else to a running kloigos, so the dashboard and the API share one origin.
//
//   node tests/browser/devproxy.mjs --listen 127.0.0.1:8089 --upstream 127.0.0.1:8088
//
// run.sh falls back to it only when the kloigos binary does not serve `/` yet.
import http from 'node:http';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const web = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../web');
const [lhost, lport] = arg('--listen', '127.0.0.1:8089').split(':');
const [uhost, uport] = arg('--upstream', '127.0.0.1:8088').split(':');
const files = {
  '/': ['index.html', 'text/html; charset=utf-8'],
  '/index.html': ['index.html', 'text/html; charset=utf-8'],
  '/assets/app.js': ['app.js', 'text/javascript; charset=utf-8'],
  '/assets/app.css': ['app.css', 'text/css; charset=utf-8'],
};

http
  .createServer(async (req, res) => {
    const f = files[req.url.split('?')[0]];
    if (f && req.method === 'GET') {
      res.writeHead(200, { 'content-type': f[1], 'cache-control': 'no-store' });
      res.end(await readFile(path.join(web, f[0])));
      return;
    }
    const up = http.request(
      { host: uhost, port: uport, method: req.method, path: req.url, headers: req.headers },
      (r) => {
        res.writeHead(r.statusCode, r.headers);
        r.pipe(res);
      },
    );
    up.on('error', (e) => {
      res.writeHead(502, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ detail: `devproxy: ${e.message}` }));
    });
    req.pipe(up);
  })
  .listen(Number(lport), lhost, () => console.log(`devproxy on http://${lhost}:${lport} -> ${uhost}:${uport}`));
