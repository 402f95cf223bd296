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
  // Scroll the viewport on screen to the CT instance and return its canvas once two renderings a moment
  // apart are the same and not blank. OHIF replaces the viewport instance (same id, same canvas) while it
  // sets up a SEG it was given, so the viewport is looked up again before every rendering.
  return page.evaluate(async ({ sop, world }) => {
    const settle = () => new Promise((resolve) => setTimeout(() => requestAnimationFrame(resolve), 300));
    const locate = () => {
      const shown = window.cornerstone.getEnabledElements().filter((e) => e.viewport.canvas?.isConnected);
      const ids = shown.length === 1 ? shown[0].viewport.getImageIds?.() ?? [] : [];
      const index = ids.findIndex((id) => id.includes(`/instances/${sop}/`));
      return { viewport: index >= 0 ? shown[0].viewport : null, index, seen: `${shown.length} viewports, ${ids.length} images` };
    };
    const grab = (canvas) => {
      // Read the canvas right after cornerstone drew it (IMAGE_RENDERED), and whether anything is on it.
      const scratch = document.createElement('canvas');
      [scratch.width, scratch.height] = [canvas.width, canvas.height];
      const context = scratch.getContext('2d', { willReadFrequently: true });
      context.drawImage(canvas, 0, 0);
      const { data } = context.getImageData(0, 0, scratch.width, scratch.height);
      let drawn = false;
      for (let i = 3; i < data.length && !drawn; i += 4) drawn = data[i] > 0;
      return { png: canvas.toDataURL('image/png'), drawn };
    };
    const renderAndGrab = (viewport) => new Promise((resolve) => {
      let settled = false;
      const done = () => { if (!settled) { settled = true; resolve(grab(viewport.canvas)); } };
      viewport.element.addEventListener(window.cornerstone.Enums.Events.IMAGE_RENDERED, done, { once: true });
      setTimeout(done, 2000);
      viewport.render();
    });
    let found = locate();
    let previous = null;
    let shot = null;
    let attempt = 0;
    for (; attempt < 60; attempt += 1) {
      found = locate();
      if (!found.viewport) {
        previous = null;
        await settle();
        continue;
      }
      if (found.viewport.getCurrentImageIdIndex() !== found.index) await found.viewport.setImageIdIndex(found.index);
      shot = await renderAndGrab(found.viewport);
      if (shot.drawn && shot.png === previous) break;
      previous = shot.drawn ? shot.png : null;
      await settle();
    }
    if (!found.viewport || !shot) throw new Error(`no viewport showing SOPInstanceUID ${sop} (${found.seen})`);
    const { viewport, index } = found;
    return {
      index,
      renderings: attempt + 1,
      stable: attempt < 60,
      viewportsOnPage: window.cornerstone.getEnabledElements().length,
      shownImageId: viewport.getCurrentImageId(),
      png: shot.png,
      canvasSize: [viewport.canvas.width, viewport.canvas.height],
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
  const consoleErrors = [];
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text().slice(0, 500)); });
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
      () => (window.cornerstone.getEnabledElements() ?? []).some(
        (e) => e.viewport.canvas?.isConnected
          && window.cornerstoneTools.segmentation.state.getSegmentationRepresentations(e.viewportId).length > 0,
      ),
      null, { timeout },
    );
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
      consoleErrors,
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
