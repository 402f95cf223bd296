// Drive OHIF in headless Chromium: open a study, list its series, render CT slices without and with a SEG.
//
//   node check.mjs REQUEST.json
//
// REQUEST.json: {url, studyUID, chromium, outDir, timeoutMs,
//                segs: [{name, seriesDescription}],
//                slices: [{k, sopInstanceUID, world: [[x,y,z] of voxel (k,0,0), (k,0,1), (k,1,0)]}]}
// For each SEG a fresh page opens `${url}/viewer?StudyInstanceUIDs=...` (OHIF's basic viewer), each slice
// is shown and its viewport canvas saved as `${outDir}/<seg>-k<k>-plain.png`; then the SEG thumbnail is
// double-clicked in the study browser (what a reader does) and the same slices are saved as
// `...-overlay.png`. With every canvas goes where the three world points land on it (cornerstone's
// worldToCanvas), so the caller can map canvas pixels back to the label map's voxels.
// Writes `${outDir}/result.json`; exits 1 with the error on stderr when the viewer does not get there.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const request = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const timeout = request.timeoutMs ?? 60000;
mkdirSync(request.outDir, { recursive: true });

// Without the background-networking flags Chromium's own connections get refused on an offline host;
// SwiftShader gives WebGL without a GPU (cornerstone falls back to CPU rendering otherwise).
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
];

function viewportState() {
  // Runs in the page: OHIF puts cornerstone on window (extension-cornerstone init).
  const enabled = window.cornerstone?.getEnabledElements?.() ?? [];
  return enabled.map((e) => ({
    viewportId: e.viewportId,
    type: e.viewport.type,
    imageIds: e.viewport.getImageIds?.() ?? [],
  }));
}

async function waitForStack(page) {
  await page.waitForFunction(
    () => (window.cornerstone?.getEnabledElements?.() ?? []).some((e) => (e.viewport.getImageIds?.() ?? []).length > 0),
    null, { timeout },
  );
}

async function showSlice(page, slice) {
  // Scroll the (only) stack viewport to the CT instance, wait until it is rendered, return its canvas.
  return page.evaluate(async ({ sop, world }) => {
    const { viewport } = window.cornerstone.getEnabledElements()[0];
    const ids = viewport.getImageIds();
    const index = ids.findIndex((id) => id.includes(`/instances/${sop}/`));
    if (index < 0) throw new Error(`no image of SOPInstanceUID ${sop} among ${ids.length} in the viewport`);
    await viewport.setImageIdIndex(index);
    viewport.render();
    await new Promise((resolve) => setTimeout(resolve, 400));
    for (let i = 0; i < 3; i += 1) await new Promise((resolve) => requestAnimationFrame(resolve));
    const canvas = viewport.canvas ?? viewport.element.querySelector('canvas');
    const shown = viewport.getCurrentImageId();
    return {
      index,
      shownImageId: shown,
      png: canvas.toDataURL('image/png'),
      canvasSize: [canvas.width, canvas.height],
      devicePixelRatio: window.devicePixelRatio,
      worldToCanvas: world.map((p) => Array.from(viewport.worldToCanvas(p))),
      cpuRendering: window.cornerstone.getShouldUseCPURendering?.() ?? null,
    };
  }, { sop: slice.sopInstanceUID, world: slice.world });
}

async function capture(page, segName, phase) {
  const shots = [];
  for (const slice of request.slices) {
    const shot = await showSlice(page, slice);
    const file = join(request.outDir, `${segName}-k${slice.k}-${phase}.png`);
    writeFileSync(file, Buffer.from(shot.png.split(',')[1], 'base64'));
    delete shot.png;
    shots.push({ k: slice.k, file, ...shot });
  }
  return shots;
}

async function listedSeries(page) {
  return page.evaluate(() => window.services.displaySetService.getActiveDisplaySets().map((d) => ({
    modality: d.Modality,
    seriesDescription: d.SeriesDescription,
    seriesInstanceUID: d.SeriesInstanceUID,
  })));
}

async function segmentations(page) {
  return page.evaluate(() => window.cornerstoneTools.segmentation.state.getSegmentations().map((s) => ({
    label: s.label,
    segments: Object.values(s.segments).map((g) => ({ index: g.segmentIndex, label: g.label })),
  })));
}

async function checkSeg(browser, seg) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 }, deviceScaleFactor: 1 });
  const errors = [];
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  page.on('response', (r) => {
    if (r.status() >= 400) errors.push(`HTTP ${r.status()} ${r.url()} (Accept: ${r.request().headers().accept})`);
  });
  try {
    // OHIF's first-visit tour (shepherd.js) covers the page whenever it comes up: skip it.
    await page.addLocatorHandler(page.getByText('Skip all', { exact: true }), (tour) => tour.click());
    await page.goto(`${request.url}/viewer?StudyInstanceUIDs=${request.studyUID}`, { timeout });
    await waitForStack(page);
    const plain = await capture(page, seg.name, 'plain');
    const browserText = await page.locator('body').innerText();
    await page.getByText(seg.seriesDescription, { exact: true }).dblclick({ timeout });
    await page.waitForFunction(
      () => (window.cornerstoneTools.segmentation.state.getSegmentations() ?? []).length > 0,
      null, { timeout },
    );
    await page.waitForTimeout(1500);
    const overlay = await capture(page, seg.name, 'overlay');
    await page.screenshot({ path: join(request.outDir, `${seg.name}-page.png`) });
    return {
      name: seg.name,
      listed: await listedSeries(page),
      studyBrowserText: browserText,
      segmentations: await segmentations(page),
      viewports: (await page.evaluate(viewportState)).map((v) => ({ ...v, imageIds: v.imageIds.length })),
      plain,
      overlay,
      errors,
    };
  } catch (error) {
    await page.screenshot({ path: join(request.outDir, `${seg.name}-failed.png`) }).catch(() => {});
    throw new Error(`SEG ${seg.name}: ${error.message}\npage errors: ${errors.join('\n')}`);
  } finally {
    await page.close();
  }
}

const browser = await chromium.launch({ executablePath: request.chromium, headless: true, args: CHROMIUM_ARGS });
try {
  const results = [];
  for (const seg of request.segs) results.push(await checkSeg(browser, seg));
  writeFileSync(join(request.outDir, 'result.json'), JSON.stringify({ segs: results }, null, 2));
} catch (error) {
  console.error(error.message);
  process.exitCode = 1;
} finally {
  await browser.close();
}
