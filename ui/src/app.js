// The videocount UI: search a video, chart its counts over a range, compute a stat, and watch
// the top videos and the live panel. Talks only to the query service that serves it.
import {
  Chart, LineController, LineElement, PointElement, LinearScale, CategoryScale, Filler, Tooltip,
} from 'chart.js';

Chart.register(LineController, LineElement, PointElement, LinearScale, CategoryScale, Filler, Tooltip);

const $ = (id) => document.getElementById(id);
const number = new Intl.NumberFormat('en-US', { maximumFractionDigits: 3 });
let chart = null;

async function getJson(path) {
  const response = await fetch(path, { headers: { Accept: 'application/json' } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const where = body.field ? ` (${body.field})` : '';
    throw new Error(`${body.message || body.error || response.statusText}${where}`);
  }
  return body;
}

function showError(error) {
  const box = $('error');
  box.hidden = !error;
  box.textContent = error ? String(error.message || error) : '';
}

/** The range the form asks for, as query parameters. */
function rangeParams() {
  const choice = $('range').value;
  if (choice === 'custom') {
    const params = new URLSearchParams({ from: $('from').value.trim() });
    if ($('to').value.trim()) params.set('to', $('to').value.trim());
    return params;
  }
  const to = Date.now();
  return new URLSearchParams({ from: String(to - Number(choice)), to: String(to) });
}

function label(iso, step) {
  if (step === 'day') return iso.slice(0, 10);
  if (step === 'hour') return `${iso.slice(5, 10)} ${iso.slice(11, 16)}`;
  return iso.slice(11, 16);
}

function drawChart(series) {
  const labels = series.points.map((p) => label(p.t, series.step));
  const data = series.points.map((p) => p.count);
  if (chart) chart.destroy();
  chart = new Chart($('chart'), {
    type: 'line',
    data: {
      labels,
      datasets: [{
        label: `${series.event_type} per ${series.step}`,
        data,
        fill: true,
        borderColor: '#2457c5',
        backgroundColor: '#2457c533',
        pointRadius: data.length > 120 ? 0 : 2,
        tension: 0.2,
      }],
    },
    options: { animation: false, maintainAspectRatio: false, scales: { y: { beginAtZero: true } } },
  });
}

async function showVideo() {
  const video = $('video').value.trim();
  const type = $('event-type').value.trim() || 'view';
  if (!video) return;
  showError(null);
  const params = rangeParams();
  const base = `/v1/videos/${encodeURIComponent(video)}/events/${encodeURIComponent(type)}`;
  try {
    const [count, series] = await Promise.all([
      getJson(`${base}/count?${params}`),
      getJson(`${base}/series?${params}`),
    ]);
    $('total').textContent = number.format(count.value);
    $('total-type').textContent = `${type} events`;
    $('range-echo').textContent = `${count.range.from} → ${count.range.to}`;
    drawChart(series);
    document.body.dataset.loaded = 'true';
    history.replaceState(null, '', `?video=${encodeURIComponent(video)}&type=${encodeURIComponent(type)}`);
  } catch (error) {
    $('total').textContent = '–';
    showError(error);
  }
}

async function showStat() {
  const video = $('video').value.trim();
  const type = $('stats-type').value.trim();
  if (!video || !type) return;
  try {
    const path = `/v1/videos/${encodeURIComponent(video)}/events/${encodeURIComponent(type)}`
      + `/stats/${encodeURIComponent($('function').value)}?${rangeParams()}`;
    const answer = await getJson(path);
    $('stat-value').textContent = answer.value === null ? 'no data' : number.format(answer.value);
  } catch (error) {
    showError(error);
  }
}

// The top list view_counts keeps for the window chosen (kept incrementally, read from the query
// service's memory); where the job runs without trending, a sum over the last hour instead.
async function refreshTop() {
  const window = $('top-window').value;
  try {
    let top;
    try {
      top = await getJson(`/v1/top?event_type=view&window=${window}&limit=10`);
    } catch (error) {
      top = await getJson('/v1/top?event_type=view&limit=10');
      top.window = null;
    }
    const body = $('top').querySelector('tbody');
    body.replaceChildren(...top.videos.map((v) => {
      const row = document.createElement('tr');
      const link = document.createElement('a');
      link.textContent = v.video_id;
      link.addEventListener('click', () => { $('video').value = v.video_id; showVideo(); });
      const name = document.createElement('td');
      name.append(link);
      const count = document.createElement('td');
      count.textContent = number.format(v.count);
      row.append(name, count);
      return row;
    }));
    const until = top.range ? new Date(top.range.to_ms).toISOString().slice(11, 16) : '–';
    $('top-note').textContent = top.window
      ? `event time up to ${until} UTC, updated live`
      : `last hour up to ${until} UTC (no top lists kept: summed)`;
  } catch (error) {
    console.warn('top videos', error);
  }
}

const fixed = (digits) => new Intl.NumberFormat(undefined, { maximumFractionDigits: digits });
const known = (v) => v !== null && v !== undefined;
const ms = (seconds) => (known(seconds) ? `${fixed(1).format(seconds * 1000)} ms` : '–');
const secs = (seconds) => (known(seconds) ? `${fixed(2).format(seconds)} s` : '–');
const perSecond = (v, unit) => (known(v) ? `${fixed(1).format(v)}${unit ? ` ${unit}` : ''}/s` : '–');
const percent = (v) => (known(v) ? `${fixed(0).format(v)} %` : '–');
const mib = (bytes) => (known(bytes) ? `${fixed(0).format(bytes / 1048576)} MiB` : '–');

function fillList(id, lines) {
  $(id).replaceChildren(...lines.map((text) => {
    const item = document.createElement('li');
    item.textContent = text;
    return item;
  }));
}

// The four golden signals, from the metrics the query service scrapes (GET /v1/live).
function showGolden(live) {
  const { ingest, jobs, query } = live.golden;
  const fresh = live.freshness;
  // Lines about ingest only when the query service knows one (--ingest-url) that answers.
  const ingestDown = ingest.url ? ingest.error : 'no ingest service configured (--ingest-url)';
  const ifIngest = (line) => (ingestDown ? [] : [line]);
  fillList('signal-latency', [
    ...ifIngest(`ingest request p99 ${ms(ingest.latency_p99_seconds)}`),
    `query request p99 ${ms(query.latency_p99_seconds)}`,
    fresh.samples
      ? `freshness p50 ${secs(fresh.p50_seconds)}, p99 ${secs(fresh.p99_seconds)} (${fresh.samples} canaries, 5 min)`
      : `freshness: ${fresh.error || 'no canary samples (needs --ingest-url)'}`,
  ]);
  fillList('signal-traffic', [
    ingestDown ? `ingest: ${ingestDown}` : `ingest ${perSecond(ingest.events_per_second, 'events')}`,
    ...jobs.map((j) => (j.error ? `${j.job}: ${j.error}` : `${j.job} ${perSecond(j.messages_per_second, 'messages')}, ${perSecond(j.rows_per_second, 'rows')}`)),
    `query ${perSecond(query.requests_per_second, 'requests')}`,
  ]);
  fillList('signal-errors', [
    ...ifIngest(`ingest 5xx ${perSecond(ingest.errors_5xx_per_second, '')}, 4xx ${perSecond(ingest.errors_4xx_per_second, '')}`),
    `query 5xx ${perSecond(query.errors_5xx_per_second, '')}`,
    ...jobs.map((j) => `${j.job} dead letters ${perSecond(j.dead_letters_per_second, '')}, insert retries ${perSecond(j.insert_retries_per_second, '')}`),
  ]);
  fillList('signal-saturation', [
    ...jobs.map((j) => `${j.job} lag ${number.format(j.lag_messages)} messages (${secs(j.lag_seconds)}), writer queue ${percent(100 * j.writer_queue_fill)}, CPU ${percent(j.cpu_percent)}, ${mib(j.resident_bytes)}`),
    ...ifIngest(`ingest CPU ${percent(ingest.cpu_percent)}, producer queue ${percent(known(ingest.producer_queue_fill) ? 100 * ingest.producer_queue_fill : null)}, ${mib(ingest.resident_bytes)}`),
    `query CPU ${percent(query.cpu_percent)}, ${mib(query.resident_bytes)}`,
  ]);
  if (!jobs.length) $('signal-saturation').append(Object.assign(document.createElement('li'), { textContent: 'jobs: none configured (--job-metrics-url)' }));
}

async function refreshLive() {
  try {
    const live = await getJson('/v1/live');
    showGolden(live);
    fillList('jobs', live.jobs.map((j) => `${j.job} (${j.topic}): last commit ${j.seconds_since_commit} s ago`));
    fillList('dead-letters', live.dead_letters.map((d) => `${d.time} ${d.job} p${d.partition}@${d.offset}: ${d.reason} — ${d.detail}`));
    if (!live.dead_letters.length) $('dead-letters').textContent = 'none';
  } catch (error) {
    fillList('signal-latency', [`unavailable: ${error.message}`]);
  }
}

$('range').addEventListener('change', () => { $('custom-range').hidden = $('range').value !== 'custom'; });
$('search').addEventListener('submit', (event) => { event.preventDefault(); showVideo(); showStat(); });
$('stats-go').addEventListener('click', showStat);

const initial = new URLSearchParams(location.search);
if (initial.get('video')) {
  $('video').value = initial.get('video');
  if (initial.get('type')) $('event-type').value = initial.get('type');
  showVideo();
}
refreshTop();
refreshLive();
setInterval(refreshTop, 2000);
$('top-window').addEventListener('change', refreshTop);
setInterval(refreshLive, 5000);
