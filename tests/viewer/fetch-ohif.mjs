// Fetch the prebuilt OHIF viewer (the dist/ folder of the npm package pinned in package.json "ohif") with
// `npm pack`, check the tarball against the pinned integrity, and unpack dist/ into ./ohif-dist/.
//
// Why not a dependency: @ohif/app 3.13.2 depends on @ohif/i18n@3.13.2 and @ohif/ui@3.13.2, which the npm
// registry does not serve (npm install fails with ETARGET); its dist/ is a complete static build that
// needs none of its dependencies.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const here = new URL('.', import.meta.url).pathname;
const { ohif } = JSON.parse(readFileSync(join(here, 'package.json'), 'utf8'));
const target = join(here, 'ohif-dist');
const stamp = join(target, '.thighnode-ohif');

if (existsSync(stamp) && readFileSync(stamp, 'utf8') === ohif.integrity) {
  console.log(`ohif-dist: ${ohif.package} already unpacked`);
  process.exit(0);
}
const work = mkdtempSync(join(tmpdir(), 'ohif-'));
try {
  const packed = JSON.parse(
    execFileSync('npm', ['pack', ohif.package, '--json', '--pack-destination', work], { encoding: 'utf8' }),
  )[0];
  const tarball = join(work, packed.filename);
  const integrity = 'sha512-' + createHash('sha512').update(readFileSync(tarball)).digest('base64');
  if (integrity !== ohif.integrity) {
    throw new Error(`${ohif.package}: tarball integrity ${integrity}, package.json pins ${ohif.integrity}`);
  }
  execFileSync('tar', ['-xzf', tarball, '-C', work, 'package/dist']);
  rmSync(target, { recursive: true, force: true });
  renameSync(join(work, 'package', 'dist'), target);
  writeFileSync(stamp, ohif.integrity);
  console.log(`ohif-dist: ${ohif.package} unpacked (${integrity.slice(0, 20)}...)`);
} finally {
  rmSync(work, { recursive: true, force: true });
}
