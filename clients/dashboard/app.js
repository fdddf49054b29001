/* The live supervisor dashboard: conversation list, per-speaker emotion timeline, badges,
 * transcript and escalation alerts. Plain JS, no build step; uPlot draws the timeline.
 *
 * Data: GET v1/dashboard/config (labels, valence, the server's alert rule), GET v1/conversations
 * (polled), WebSocket v1/watch?conversation_id=..&after=ENTRY_ID&alerts_after=ENTRY_ID (stored
 * results and alert events, then live ones). Escalation alerts are the server's `alert` events
 * (raised / cleared, computed when each final is committed); the page never decides them itself.
 * The watch socket reconnects with backoff and resumes after the last entry ids it saw; results
 * are deduplicated by (utterance_id, is_final) and alerts by alert_id, so a replay never shows
 * anything twice.
 */
(function () {
  "use strict";

  // ------------------------------------------------------------------ where the server is
  // app.js lives at <base>/dashboard/app.js; the API is under <base>/v1/...
  const SCRIPT_URL = document.currentScript ? document.currentScript.src : location.href;
  const BASE = new URL("..", SCRIPT_URL);
  const api = (path) => new URL(path, BASE).toString();
  const wsUrl = (path) => {
    const u = new URL(path, BASE);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    return u.toString();
  };

  // ------------------------------------------------------------------ the API key
  // The page itself is public; every data call carries an API key (docs/security.md). The key
  // comes from the URL fragment (#key=..., taken out of the address bar at once, never sent to
  // the server in a URL) or from the key form, and is kept in sessionStorage for this tab.
  const KEY_STORAGE = "tracker.apiKey";
  let apiKey = null;
  try { apiKey = sessionStorage.getItem(KEY_STORAGE); } catch (e) { /* storage disabled */ }

  function setKey(key) {
    apiKey = key || null;
    try {
      if (apiKey) sessionStorage.setItem(KEY_STORAGE, apiKey);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch (e) { /* storage disabled: the key lives as long as the page */ }
  }

  function takeKeyFromHash() {
    const m = /(?:^#|&)key=([^&]*)/.exec(location.hash);
    if (!m) return false;
    setKey(decodeURIComponent(m[1]));
    const rest = location.hash.replace(/(^#|&)key=[^&]*/, "$1").replace(/^#&/, "#").replace(/&$/, "");
    history.replaceState(null, "", location.pathname + location.search + (rest === "#" ? "" : rest));
    return true;
  }
  takeKeyFromHash();

  const authed = (opts) => {
    const o = { ...(opts || {}) };
    o.headers = { ...(o.headers || {}) };
    if (apiKey) o.headers.Authorization = "Bearer " + apiKey;
    return o;
  };
  // browsers cannot set headers on a WebSocket: the key travels as a subprotocol next to tracker.v1
  const wsProtocols = () => (apiKey ? ["tracker.v1", "bearer." + apiKey] : ["tracker.v1"]);

  let keyRefused = false;
  function needKey(message) {
    keyRefused = true;
    const form = document.getElementById("key-form");
    if (!form) return;
    form.hidden = false;
    document.getElementById("key-message").textContent = message;
    el("server-status").dataset.state = "locked";
    el("server-status").title = message;
  }

  function keyEntered(key) {
    setKey(key.trim());
    keyRefused = false;
    document.getElementById("key-form").hidden = true;
    loadConfig();
    if (conv) open(conv.id); // a fresh view under the new key (another tenant sees other calls)
  }

  const POLL_MS = 2000;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;

  // ------------------------------------------------------------------ colours
  // One colour per emotion, used by the badge, the transcript chip, the timeline points and strips.
  const NAMED_COLORS = {
    neutral: "#8a94a6", calm: "#5fb3b3", peaceful: "#5fb3b3",
    joy: "#f0b429", happy: "#f0b429", joyful: "#f0b429", powerful: "#f5803e",
    surprise: "#14b8c4", surprised: "#14b8c4",
    anger: "#e5484d", angry: "#e5484d", mad: "#e5484d",
    sadness: "#3e7bfa", sad: "#3e7bfa",
    disgust: "#2f9e5b",
    fear: "#9d5cf0", fearful: "#9d5cf0", scared: "#9d5cf0",
    negative: "#e5484d", positive: "#2f9e5b",
  };
  const SPARE_COLORS = ["#f5803e", "#d6409f", "#0d9488", "#a16207", "#64748b", "#7c3aed", "#be123c"];
  const SPEAKER_STYLES = [
    { stroke: "#1e293b", dash: [] },
    { stroke: "#94a3b8", dash: [6, 4] },
    { stroke: "#0e7490", dash: [2, 3] },
    { stroke: "#a16207", dash: [8, 3, 2, 3] },
  ];

  // ------------------------------------------------------------------ state
  const config = {
    labels: ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"],
    negative: ["anger", "sadness", "disgust", "fear"],
    valence: { neutral: 0, joy: 0.8, surprise: 0.2, anger: -0.7, sadness: -0.7, disgust: -0.6, fear: -0.6 },
    alert: { k: 3, m: 4, clear: 1, speakers: [] }, // the server's rule, for display only
  };
  const colorOf = {};

  let conversations = []; // latest list from the server
  let conv = null; // the selected conversation's live state (see newConversationState)
  let renderQueued = false;
  let chart = null;
  let chartSpeakers = ""; // speakers the current uPlot instance was built for

  const el = (id) => document.getElementById(id);

  function assignColors() {
    let spare = 0;
    for (const label of config.labels) {
      colorOf[label] = NAMED_COLORS[label] || SPARE_COLORS[spare++ % SPARE_COLORS.length];
    }
  }
  const labelColor = (label) => colorOf[label] || "#64748b";

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "style") node.setAttribute("style", v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  // ------------------------------------------------------------------ formatting
  function fmtClock(ms) {
    if (ms === null || ms === undefined || !isFinite(ms)) return "–";
    const s = Math.max(0, ms) / 1000;
    const m = Math.floor(s / 60);
    const rest = s - 60 * m;
    return `${m}:${rest < 10 ? "0" : ""}${rest.toFixed(1)}`;
  }
  function fmtAgo(ms) {
    if (!ms) return "–";
    const d = Math.max(0, (Date.now() - ms) / 1000);
    if (d < 5) return "just now";
    if (d < 60) return `${Math.round(d)} s ago`;
    if (d < 3600) return `${Math.round(d / 60)} min ago`;
    if (d < 86400) return `${Math.round(d / 3600)} h ago`;
    return new Date(ms).toLocaleDateString();
  }
  const pct = (p) => (p === null || p === undefined || !isFinite(p) ? "–" : `${Math.round(100 * p)}%`);
  const confidence = (rec) => {
    const p = rec && rec.probabilities ? rec.probabilities[rec.label] : undefined;
    return typeof p === "number" ? p : null;
  };

  // ------------------------------------------------------------------ conversation list
  async function loadConfig() {
    try {
      const r = await fetch(api("v1/dashboard/config"), authed());
      if (r.status === 401) needKey(apiKey ? "this API key was refused (unknown or revoked)" : "enter an API key to see calls");
      if (r.ok) Object.assign(config, await r.json());
    } catch (e) {
      console.warn("dashboard config unavailable, using MELD defaults", e);
    }
    assignColors();
    renderLegend();
  }

  async function pollConversations() {
    try {
      const r = await fetch(api("v1/conversations?limit=50"), authed({ cache: "no-store" }));
      if (r.status === 401) {
        needKey(apiKey ? "this API key was refused (unknown or revoked)" : "enter an API key to see calls");
        conversations = [];
        renderList();
        setTimeout(pollConversations, POLL_MS);
        return;
      }
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      conversations = (await r.json()).conversations || [];
      el("server-status").dataset.state = "ok";
      el("server-status").title = "conversation list updated " + new Date().toLocaleTimeString();
    } catch (e) {
      el("server-status").dataset.state = "down";
      el("server-status").title = "cannot reach the server: " + e.message;
    }
    renderList();
    if (conv) {
      // a call older than the list's 50 keeps its header fresh through its own endpoint
      const listed = conversations.some((c) => c.conversation_id === conv.id);
      if (!listed && ++conv.metaPolls % 5 === 0) fetchMeta(conv);
      renderHeader();
    }
    setTimeout(pollConversations, POLL_MS);
  }

  const listItems = new Map(); // conversation_id -> <li>

  function renderList() {
    const list = el("conversation-list");
    const seen = new Set();
    conversations.forEach((c) => {
      seen.add(c.conversation_id);
      let li = listItems.get(c.conversation_id);
      if (!li) {
        li = h("li", { class: "conversation-item", "data-testid": "conversation-item", "data-id": c.conversation_id,
                       tabindex: "0", role: "button" });
        li.addEventListener("click", () => select(c.conversation_id));
        li.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") select(c.conversation_id); });
        listItems.set(c.conversation_id, li);
      }
      li.dataset.status = c.status;
      li.classList.toggle("selected", !!conv && conv.id === c.conversation_id);
      li.replaceChildren(
        h("div", { class: "ci-top" },
          h("span", { class: "ci-id", text: c.conversation_id, title: c.conversation_id }),
          h("span", { class: `status-badge ${c.status}`, "data-testid": "status-badge", text: c.status })),
        h("div", { class: "ci-sub muted small" },
          h("span", { text: `${c.n_final} utt.` }),
          h("span", { class: "ci-speakers", text: (c.speakers || []).join(", ") || "–" }),
          h("span", { class: "ci-time", title: c.updated_at ? new Date(c.updated_at).toLocaleString() : "", text: fmtAgo(c.updated_at) })),
      );
      list.append(li); // (re)appending keeps the server's order: most recent first
    });
    for (const [id, li] of listItems) {
      if (!seen.has(id)) { li.remove(); listItems.delete(id); }
    }
    el("conversation-empty").hidden = conversations.length > 0;
    const live = conversations.filter((c) => c.status === "live").length;
    el("conversation-count").textContent = conversations.length ? `${live} live · ${conversations.length} total` : "";
  }

  // ------------------------------------------------------------------ selection
  function selectedFromHash() {
    const m = /(?:^#|&)conversation=([^&]*)/.exec(location.hash);
    return m ? decodeURIComponent(m[1]) : null;
  }

  function select(id) {
    const want = "#conversation=" + encodeURIComponent(id);
    if (location.hash !== want) {
      location.hash = want; // hashchange calls open()
    } else if (!conv || conv.id !== id) {
      open(id);
    }
  }

  function newConversationState(id) {
    return {
      id,
      meta: null,
      utts: new Map(), // utterance_id -> {id, order, interim, final}
      order: 0,
      seen: new Set(), // "utterance_id|f" / "utterance_id|p"
      lastEntryId: "0-0",
      lastAlertId: "0-0",
      alertIds: new Set(), // alert events already applied
      alertEvents: {}, // speaker -> the latest alert event from the server
      ws: null,
      gen: 0,
      backoff: BACKOFF_MIN_MS,
      timer: null,
      feed: "connecting",
      error: null,
      alerts: {}, // speaker -> bool, as currently shown
      alertChanges: [], // every change of a shown alert: {speaker, raised, utterance_id, at}
      connects: 0,
      metaPolls: 0,
    };
  }

  function open(id) {
    close();
    conv = newConversationState(id);
    el("no-selection").hidden = true;
    el("conversation-view").hidden = false;
    el("transcript").replaceChildren();
    delete el("transcript").dataset.conversation;
    rowNodes.clear();
    el("speakers").replaceChildren();
    el("strips").replaceChildren();
    if (chart) { chart.destroy(); chart = null; chartSpeakers = ""; }
    renderList();
    fetchMeta(conv);
    connect(conv);
    scheduleRender();
  }

  function close() {
    if (!conv) return;
    conv.gen++; // callbacks of the old socket see a stale generation and do nothing
    clearTimeout(conv.timer);
    if (conv.ws) try { conv.ws.close(1000, "deselected"); } catch (e) { /* already closed */ }
    conv = null;
  }

  async function fetchMeta(state) {
    try {
      const r = await fetch(api("v1/conversations/" + encodeURIComponent(state.id)), authed({ cache: "no-store" }));
      if (r.ok && conv === state) {
        const body = await r.json();
        delete body.utterances; // those come through the watch socket
        state.meta = body;
      }
    } catch (e) { /* the list poll keeps the header fresh anyway */ }
    if (conv === state) renderHeader();
  }

  // ------------------------------------------------------------------ the watch socket
  function connect(state) {
    if (conv !== state) return;
    const gen = ++state.gen;
    const url = wsUrl(`v1/watch?conversation_id=${encodeURIComponent(state.id)}` +
      `&after=${encodeURIComponent(state.lastEntryId)}&alerts_after=${encodeURIComponent(state.lastAlertId)}`);
    let ws;
    try {
      ws = new WebSocket(url, wsProtocols());
    } catch (e) {
      return retry(state, gen);
    }
    state.ws = ws;
    state.connects++;
    setFeed(state, "connecting");
    let openedAt = 0;
    ws.onopen = () => {
      if (gen !== state.gen) return;
      openedAt = Date.now();
      setFeed(state, "live");
    };
    ws.onmessage = (ev) => {
      if (gen !== state.gen) return;
      state.backoff = BACKOFF_MIN_MS; // a working feed resets the backoff
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      onMessage(state, msg);
    };
    ws.onerror = () => { /* onclose follows */ };
    ws.onclose = (ev) => {
      if (gen !== state.gen) return;
      if (ev.code === 4401) { // refused key: wait for a new one (keyEntered reconnects)
        state.ws = null;
        setFeed(state, "reconnecting");
        needKey("this API key was refused (unknown or revoked)");
        return;
      }
      if (openedAt && Date.now() - openedAt > 5000) state.backoff = BACKOFF_MIN_MS;
      retry(state, gen);
    };
  }

  function retry(state, gen) {
    if (conv !== state || gen !== state.gen) return;
    state.ws = null;
    const delay = Math.max(state.backoff, state.pauseUntil ? state.pauseUntil - Date.now() : 0);
    state.pauseUntil = 0;
    const jittered = delay * (0.8 + 0.4 * Math.random());
    state.backoff = Math.min(BACKOFF_MAX_MS, state.backoff * 2);
    setFeed(state, "reconnecting", Math.round(jittered));
    state.timer = setTimeout(() => connect(state), jittered);
  }

  function setFeed(state, feed, delayMs) {
    state.feed = feed;
    const node = el("feed-status");
    node.dataset.state = feed;
    node.textContent =
      feed === "live" ? "live feed" :
      feed === "connecting" ? "connecting…" :
      feed === "reconnecting" ? `reconnecting in ${(delayMs / 1000).toFixed(1)} s…` : feed;
    publish();
  }

  function entryIdGreater(a, b) {
    const [am, as] = String(a).split("-").map(Number);
    const [bm, bs] = String(b).split("-").map(Number);
    return am > bm || (am === bm && (as || 0) > (bs || 0));
  }

  function onMessage(state, msg) {
    if (msg.type === "error") {
      // (the server may put a whole traceback in `message`: show its last line only)
      const lines = String(msg.message || "error").split("\n").map((l) => l.trim()).filter(Boolean);
      state.error = (lines[lines.length - 1] || "error").slice(0, 160);
      if (msg.code === 4002) { state.lastEntryId = "0-0"; state.lastAlertId = "0-0"; } // a bad cursor: start over
      renderHeader();
      return;
    }
    if (msg.type === "alert") return onAlert(state, msg);
    if (msg.type !== "utterance" || !msg.utterance_id) return;
    state.error = null;
    if (msg.conversation_id && msg.conversation_id !== state.id) return;
    if (msg.entry_id && entryIdGreater(msg.entry_id, state.lastEntryId)) state.lastEntryId = msg.entry_id;
    const key = msg.utterance_id + (msg.is_final ? "|f" : "|p");
    if (state.seen.has(key)) return; // a replay after reconnecting
    state.seen.add(key);
    let u = state.utts.get(msg.utterance_id);
    if (!u) {
      u = { id: msg.utterance_id, order: state.order++, interim: null, final: null };
      state.utts.set(msg.utterance_id, u);
    }
    if (msg.is_final) u.final = msg;
    else u.interim = msg;
    scheduleRender();
  }

  /* An escalation alert raised or cleared by the server (stored with the conversation in Redis). */
  function onAlert(state, msg) {
    if (!msg.alert_id || !msg.speaker || (msg.conversation_id && msg.conversation_id !== state.id)) return;
    if (msg.entry_id && entryIdGreater(msg.entry_id, state.lastAlertId)) state.lastAlertId = msg.entry_id;
    if (state.alertIds.has(msg.alert_id)) return; // a replay after reconnecting
    state.alertIds.add(msg.alert_id);
    const prev = state.alertEvents[msg.speaker];
    if (prev && entryIdGreater(prev.entry_id, msg.entry_id)) return; // older than what is shown
    state.alertEvents[msg.speaker] = msg;
    state.alertChanges.push({ speaker: msg.speaker, raised: msg.kind === "raised", utterance_id: msg.utterance_id,
                              alert_id: msg.alert_id, at: Date.now() });
    scheduleRender();
  }

  // ------------------------------------------------------------------ derived state
  function finalsBySpeaker(state) {
    const out = new Map();
    const finals = [...state.utts.values()].filter((u) => u.final).sort((a, b) => a.order - b.order);
    for (const u of finals) {
      const s = u.final.speaker;
      if (!out.has(s)) out.set(s, []);
      out.get(s).push(u.final);
    }
    return out;
  }

  /* A speaker's escalation as the server reported it (its latest alert event), and the window of
   * recent finals for display (the rule's own negative labels, from /v1/dashboard/config). */
  function escalation(state, speaker, finals) {
    const ev = state.alertEvents[speaker];
    const negative = new Set(config.alert.negative || config.negative);
    const recent = finals.slice(-config.alert.m);
    return { raised: !!ev && ev.kind === "raised", event: ev || null, window: recent,
             neg: recent.filter((f) => negative.has(f.label)).length };
  }

  function speakersOf(state, finalsMap) {
    const names = new Set(state.meta && state.meta.speakers ? state.meta.speakers : []);
    const listed = conversations.find((c) => c.conversation_id === state.id);
    if (listed) (listed.speakers || []).forEach((s) => names.add(s));
    for (const u of state.utts.values()) names.add((u.final || u.interim).speaker);
    for (const s of finalsMap.keys()) names.add(s);
    return [...names].sort();
  }

  // ------------------------------------------------------------------ rendering
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      render();
    });
  }

  function render() {
    if (!conv) return;
    const finalsMap = finalsBySpeaker(conv);
    const speakers = speakersOf(conv, finalsMap);
    renderHeader();
    renderSpeakers(conv, speakers, finalsMap);
    renderTimeline(conv, speakers, finalsMap);
    renderTranscript(conv);
    publish(finalsMap);
  }

  function renderHeader() {
    if (!conv) return;
    const listed = conversations.find((c) => c.conversation_id === conv.id) || conv.meta || {};
    el("conv-title").textContent = conv.id;
    const status = listed.status || (conv.utts.size ? "unknown" : "waiting");
    const badge = el("conv-status");
    badge.textContent = status;
    badge.className = `status-badge ${status}`;
    const n = [...conv.utts.values()].filter((u) => u.final).length;
    const parts = [];
    if (listed.created_at) parts.push("started " + new Date(listed.created_at).toLocaleTimeString());
    parts.push(`${n} labelled utterance${n === 1 ? "" : "s"}`);
    if (listed.updated_at) parts.push("last update " + fmtAgo(listed.updated_at));
    if (conv.error) parts.push("feed error: " + conv.error);
    el("conv-meta").textContent = parts.join(" · ");
  }

  function renderSpeakers(state, speakers, finalsMap) {
    const box = el("speakers");
    const { m } = config.alert;
    box.replaceChildren(...speakers.map((s, i) => {
      const finals = finalsMap.get(s) || [];
      const last = finals[finals.length - 1];
      const esc = escalation(state, s, finals);
      state.alerts[s] = esc.raised;
      const style = SPEAKER_STYLES[i % SPEAKER_STYLES.length];
      const badge = last
        ? h("span", { class: "emotion-badge", "data-testid": `badge-${s}`, "data-label": last.label,
                      style: `--c:${labelColor(last.label)}`, title: `latest final label of ${s}` },
            h("span", { class: "eb-label", text: last.label }),
            h("span", { class: "eb-conf", text: pct(confidence(last)) }))
        : h("span", { class: "emotion-badge pending", "data-testid": `badge-${s}`, text: "waiting…" });
      const dots = h("span", { class: "recent-dots", title: `last ${m} final labels (oldest first)` },
        ...esc.window.map((f) => h("span", { class: "dot", style: `--c:${labelColor(f.label)}`, title: f.label })));
      const alert = esc.raised
        ? h("div", { class: "alert", role: "alert", "data-testid": `alert-${s}` },
            h("strong", { text: "Escalation" }),
            ` ${esc.event.negative} of the last ${esc.event.window} utterances negative`)
        : null;
      return h("div", { class: "card speaker-card" + (esc.raised ? " alerting" : ""), "data-speaker": s, "data-testid": `speaker-${s}` },
        h("div", { class: "sc-top" },
          h("span", { class: "speaker-swatch", style: `--c:${style.stroke}` }),
          h("span", { class: "speaker-name", text: s }),
          badge),
        h("div", { class: "sc-sub muted small" },
          h("span", { text: `${finals.length} utterance${finals.length === 1 ? "" : "s"}` }),
          dots,
          h("span", { text: finals.length ? `${esc.neg}/${esc.window.length} negative` : "" })),
        alert);
    }));
  }

  function renderLegend() {
    el("label-legend").replaceChildren(...config.labels.map((l) =>
      h("span", { class: "legend-item" },
        h("span", { class: "dot", style: `--c:${labelColor(l)}` }),
        `${l}${config.negative.includes(l) ? " (neg.)" : ""}`)));
  }

  function timelineData(speakers, finalsMap) {
    const xsSet = new Set();
    const pts = {};
    for (const s of speakers) {
      pts[s] = (finalsMap.get(s) || []).map((f) => ({ x: (f.end_ms || 0) / 1000, y: f.score, label: f.label, rec: f }));
      pts[s].forEach((p) => xsSet.add(p.x));
    }
    const xs = [...xsSet].sort((a, b) => a - b);
    const index = new Map(xs.map((x, i) => [x, i]));
    const data = [xs];
    const labels = [];
    for (const s of speakers) {
      const ys = new Array(xs.length).fill(null);
      const ls = new Array(xs.length).fill(null);
      for (const p of pts[s]) { ys[index.get(p.x)] = p.y; ls[index.get(p.x)] = p.label; }
      data.push(ys);
      labels.push(ls);
    }
    return { data, labels, pts };
  }

  function yRange() {
    const vals = Object.values(config.valence || {}).filter((v) => typeof v === "number");
    const lo = Math.min(-1, ...vals);
    const hi = Math.max(1, ...vals);
    return [lo - 0.1 * (hi - lo) / 2, hi + 0.1 * (hi - lo) / 2];
  }

  let timelineLabels = [];

  function drawLabelPoints(u) {
    const ctx = u.ctx;
    const px = uPlot.pxRatio || devicePixelRatio || 1;
    const r = 6 * px;
    ctx.save();
    ctx.setLineDash([]); // the series' dash pattern must not cut the markers' outline
    ctx.lineWidth = 2 * px;
    for (let si = 1; si < u.series.length; si++) {
      if (!u.series[si].show) continue;
      const ys = u.data[si];
      const ls = timelineLabels[si - 1] || [];
      for (let i = 0; i < ys.length; i++) {
        if (ys[i] === null || ys[i] === undefined) continue;
        const cx = u.valToPos(u.data[0][i], "x", true);
        const cy = u.valToPos(ys[i], "y", true);
        ctx.beginPath();
        ctx.arc(cx, cy, r, 0, 2 * Math.PI);
        ctx.fillStyle = labelColor(ls[i]);
        ctx.fill();
        ctx.strokeStyle = "#ffffff";
        ctx.stroke();
      }
    }
    ctx.restore();
  }

  function renderTimeline(state, speakers, finalsMap) {
    const { data, labels, pts } = timelineData(speakers, finalsMap);
    timelineLabels = labels;
    const box = el("timeline");
    el("timeline-empty").hidden = data[0].length > 0;
    const key = speakers.join("\u0000");
    state.points = Object.fromEntries(speakers.map((s) => [s, pts[s].map((p) => [p.x, p.y])]));
    renderStrips(speakers, finalsMap);
    if (typeof uPlot === "undefined") return; // the vendored chart failed to load: strips and transcript still work
    if (!chart || chartSpeakers !== key) {
      if (chart) chart.destroy();
      chartSpeakers = key;
      const width = Math.max(300, box.clientWidth || 600);
      const opts = {
        width,
        height: 240,
        scales: {
          x: { time: false, range: (u, min, max) => [0, Math.max(10, (max || 0) + 2)] }, // the call starts at 0 s
          y: { range: yRange() },
        },
        legend: { show: true, live: true },
        cursor: { points: { show: false }, drag: { x: false, y: false } },
        axes: [
          { label: "call time (s)", stroke: "#475569", grid: { stroke: "#eef2f6" }, ticks: { stroke: "#e2e8f0" } },
          { label: "valence", stroke: "#475569", grid: { stroke: "#eef2f6" }, ticks: { stroke: "#e2e8f0" },
            values: (u, vals) => vals.map((v) => (v > 0 ? "+" : "") + v.toFixed(1)) },
        ],
        series: [
          { label: "t (s)", value: (u, v) => (v === null || v === undefined ? "–" : v.toFixed(1)) },
          ...speakers.map((s, i) => {
            const st = SPEAKER_STYLES[i % SPEAKER_STYLES.length];
            return { label: s, stroke: st.stroke, dash: st.dash, width: 2, spanGaps: true, points: { show: false },
                     value: (u, v) => (v === null || v === undefined ? "–" : v.toFixed(2)) };
          }),
        ],
        hooks: { draw: [drawLabelPoints] },
      };
      chart = new uPlot(opts, data, box);
    } else {
      chart.setData(data);
    }
  }

  function renderStrips(speakers, finalsMap) {
    // per-speaker label strips: one block per final utterance, in order
    el("strips").replaceChildren(...speakers.map((s) =>
      h("div", { class: "strip", "data-speaker": s },
        h("span", { class: "strip-name", text: s }),
        h("span", { class: "strip-cells" },
          ...(finalsMap.get(s) || []).map((f) => h("span", {
            class: "strip-cell", style: `--c:${labelColor(f.label)}`, "data-label": f.label,
            title: `${fmtClock(f.start_ms)}  ${f.label} ${pct(confidence(f))}: ${f.text}` }))))));
  }

  const rowNodes = new Map(); // utterance_id -> row element, for the selected conversation

  function renderTranscript(state) {
    const box = el("transcript");
    if (box.dataset.conversation !== state.id) {
      box.replaceChildren();
      rowNodes.clear();
      box.dataset.conversation = state.id;
    }
    const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const utts = [...state.utts.values()].sort((a, b) => a.order - b.order);
    for (const u of utts) {
      const rec = u.final || u.interim;
      const provisional = !u.final;
      const revised = !!(u.final && u.interim && u.interim.label !== u.final.label);
      const sig = `${rec.label}|${provisional}|${revised}`;
      let row = rowNodes.get(u.id);
      if (row && row.dataset.sig === sig) continue;
      const next = h("div", {
          class: "transcript-row" + (provisional ? " provisional" : "") + (revised ? " revised" : ""),
          "data-testid": "transcript-row", "data-utterance-id": u.id, "data-label": rec.label,
          "data-speaker": rec.speaker, "data-final": String(!provisional), "data-revised": String(revised),
          style: `--c:${labelColor(rec.label)}` },
        h("span", { class: "tr-time", text: fmtClock(rec.start_ms) }),
        h("span", { class: "tr-speaker", text: rec.speaker }),
        h("span", { class: "tr-text", text: rec.text || "(audio only)" }),
        h("span", { class: "tr-tags" },
          h("span", { class: "label-chip", text: rec.label }),
          h("span", { class: "tr-conf", text: pct(confidence(rec)) }),
          rec.text_source === "asr" ? h("span", { class: "marker asr-marker", "data-testid": "asr",
                                                  title: `text from the service's speech recognizer, confidence ${pct(rec.asr_confidence || 0)}`,
                                                  text: "heard" }) : null,
          provisional ? h("span", { class: "marker provisional-marker", "data-testid": "provisional", text: "provisional" }) : null,
          revised ? h("span", { class: "marker revised-marker", "data-testid": "revised",
                                title: `first labelled ${u.interim.label}`, text: `revised · was ${u.interim.label}` }) : null));
      next.dataset.sig = sig;
      if (row) row.replaceWith(next);
      else box.append(next);
      rowNodes.set(u.id, next);
    }
    const n = utts.length;
    el("transcript-count").textContent = n ? `${n} utterance${n === 1 ? "" : "s"}` : "";
    if (nearBottom) box.scrollTop = box.scrollHeight;
  }

  // ------------------------------------------------------------------ what tests (and curious people) can read
  const exposed = {
    conversationId: null,
    points: {},
    alerts: {},
    alertChanges: [],
    feed: "idle",
    lastEntryId: null,
    connects: 0,
    /* Drop the watch socket as a network failure would. `pauseMs` holds the reconnect back;
       `rewind` forgets the cursor so the reconnect replays everything (dedupe must hold). */
    dropConnection(opts) {
      const o = opts || {};
      if (!conv || !conv.ws) return false;
      if (o.pauseMs) conv.pauseUntil = Date.now() + o.pauseMs;
      if (o.rewind) { conv.lastEntryId = "0-0"; conv.lastAlertId = "0-0"; }
      conv.ws.close(4000, "dropped by dropConnection()");
      return true;
    },
  };
  window.trackerDashboard = exposed;

  function publish() {
    if (!conv) {
      Object.assign(exposed, { conversationId: null, points: {}, alerts: {}, alertChanges: [], feed: "idle", lastEntryId: null });
      return;
    }
    exposed.conversationId = conv.id;
    exposed.points = conv.points || {};
    exposed.alerts = { ...conv.alerts };
    exposed.alertChanges = conv.alertChanges.slice();
    exposed.feed = conv.feed;
    exposed.lastEntryId = conv.lastEntryId;
    exposed.connects = conv.connects;
  }

  // ------------------------------------------------------------------ start
  const keyForm = document.getElementById("key-form");
  if (keyForm) {
    keyForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const input = document.getElementById("key-input");
      if (input.value.trim()) keyEntered(input.value);
      input.value = "";
    });
  }
  window.addEventListener("hashchange", () => {
    if (takeKeyFromHash()) keyEntered(apiKey || "");
    const id = selectedFromHash();
    if (id && (!conv || conv.id !== id)) open(id);
    if (!id && conv) { // back to no selection
      close();
      el("conversation-view").hidden = true;
      el("no-selection").hidden = false;
      el("feed-status").dataset.state = "idle";
      el("feed-status").textContent = "no call selected";
      renderList();
      publish();
    }
  });
  const fitChart = () => {
    const w = el("timeline").clientWidth;
    if (chart && w && Math.abs(chart.width - w) > 2) chart.setSize({ width: Math.max(300, w), height: 240 });
  };
  if (typeof ResizeObserver !== "undefined") new ResizeObserver(fitChart).observe(el("timeline"));
  else window.addEventListener("resize", fitChart);
  setInterval(() => { if (conv) renderHeader(); }, 5000);

  (async function start() {
    await loadConfig();
    const id = selectedFromHash();
    if (id) open(id);
    pollConversations();
  })();
})();
