// The browser test: Debian's Chromium driven by playwright-core. Loads the UI from a running
// query service, searches a video with a known count, checks the total and the chart, and saves
// a screenshot.
//
//   node tests/browser.mjs URL VIDEO EVENT_TYPE FROM TO EXPECTED_TOTAL SCREENSHOT [HOT_VIDEO]
//
// With HOT_VIDEO: once the top videos are shown it prints `top shown` and waits, without
// reloading the page, for HOT_VIDEO to appear in them (the caller makes it the most viewed).
import { chromium } from 'playwright-core';

const [url, video, type, from, to, expected, screenshot, hot] = process.argv.slice(2);
if (!screenshot) {
  console.error('usage: browser.mjs URL VIDEO EVENT_TYPE FROM TO EXPECTED_TOTAL SCREENSHOT');
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const browser = await chromium.launch({ executablePath, args: ['--no-sandbox', '--disable-gpu'] });
let failed = null;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on('pageerror', (error) => errors.push(error.message));
  await page.goto(url, { waitUntil: 'load' });
  await page.fill('#video', video);
  await page.fill('#event-type', type);
  await page.selectOption('#range', 'custom');
  await page.fill('#from', from);
  await page.fill('#to', to);
  await page.click('#go');
  await page.waitForSelector('body[data-loaded="true"]', { timeout: 15000 });
  const total = (await page.textContent('#total')).replace(/,/g, '');
  if (total !== expected) failed = `the page shows a total of ${total}, expected ${expected}`;
  // Chart.js draws on the canvas: it must have a size and non-blank pixels.
  const drawn = await page.evaluate(() => {
    const canvas = document.getElementById('chart');
    const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let painted = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) painted += 1;
    return { width: canvas.width, height: canvas.height, painted };
  });
  if (!failed && (drawn.width < 100 || drawn.height < 100 || drawn.painted < 1000)) {
    failed = `the chart is not drawn: ${JSON.stringify(drawn)}`;
  }
  await page.waitForFunction(() => document.querySelectorAll('#top tbody tr').length > 0, null, { timeout: 15000 })
    .catch(() => { failed = failed || 'the top videos table stayed empty'; });
  if (!failed && hot) {
    console.log('top shown');
    await page.waitForFunction(
      (id) => [...document.querySelectorAll('#top tbody a')].some((a) => a.textContent === id),
      hot,
      { timeout: 60000 },
    ).catch(() => { failed = `${hot} never appeared in the top videos without a reload`; });
  }
  if (!failed && errors.length) failed = `page errors: ${errors.join('; ')}`;
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`browser: total ${total}, chart ${drawn.width}x${drawn.height} (${drawn.painted} painted pixels), screenshot ${screenshot}`);
} finally {
  await browser.close();
}
if (failed) {
  console.error(`browser: FAILED: ${failed}`);
  process.exit(1);
}
