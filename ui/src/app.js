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

async function refreshTop() {
  try {
    const top = await getJson('/v1/top?event_type=view&limit=10');
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
  } catch (error) {
    console.warn('top videos', error);
  }
}

async function refreshLive() {
  try {
    const live = await getJson('/v1/live');
    const rate = live.ingest.events_per_second;
    $('ingest-rate').textContent = rate === null || rate === undefined
      ? (live.ingest.url ? (live.ingest.error || 'sampling…') : 'no ingest service configured')
      : `${number.format(rate)} events/s`;
    $('jobs').replaceChildren(...live.jobs.map((j) => {
      const item = document.createElement('li');
      item.textContent = `${j.job} (${j.topic}): last commit ${j.seconds_since_commit} s ago`;
      return item;
    }));
    $('dead-letters').replaceChildren(...live.dead_letters.map((d) => {
      const item = document.createElement('li');
      item.textContent = `${d.time} ${d.job} p${d.partition}@${d.offset}: ${d.reason} — ${d.detail}`;
      return item;
    }));
    if (!live.dead_letters.length) $('dead-letters').textContent = 'none';
  } catch (error) {
    $('ingest-rate').textContent = `unavailable: ${error.message}`;
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
setInterval(refreshTop, 15000);
setInterval(refreshLive, 5000);
