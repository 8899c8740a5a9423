// A consult: device check, lobby, WebRTC browser to browser, and the degradation ladder.
//
// Signaling rides the app's own channel (POST /signal, one SSE stream per participant), not
// the media path, so it survives when media dies; so does the chat. Negotiation is "perfect
// negotiation": either side may offer, the polite side (higher participant id) yields.
// Every message carries the peer connection's generation: a fresh peer connection on one side
// makes the other side start a fresh one too, and messages of older generations are dropped.
//
// The ladder (each step shown here, sent to the other side and posted with its timings):
//   send estimate below the video floor or loss > 10% for 5 s -> audio only (video back by
//   itself after 5 s of a good link); no media bytes for 2 s -> ICE restart; not back 5 s
//   later -> a fresh peer connection; no media for 10 s -> chat (already live over SSE) is
//   brought forward while a fresh connection is tried every 5 s, and the appliance's relay of
//   last resort is asked for (it joins as a participant; each page offers to it and gets the
//   other side's media through it; beyond its capacity it refuses, and the reason is shown).
(function () {
  "use strict";
  const root = document.getElementById("consult");
  if (!root || !document.getElementById("check")) return;
  const cid = Number(root.dataset.consult);
  const isHost = root.dataset.host === "true";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const params = new URLSearchParams(location.search);
  const relayOnly = params.get("relay") === "1"; // TURN only (tests, sites that must hide addresses)
  // No path between the endpoints at all (tests; a site known to block every peer path):
  // no ICE candidate goes to another person's page, only to the appliance's participants.
  const noDirect = params.get("nodirect") === "1";
  const RELAY_ASK_EVERY_MS = 60000;
  const TICK_MS = 500, SAMPLE_MS = 1000, POST_MS = 3000;
  const AUDIO_AFTER_MS = 5000, RESTART_AFTER_MS = 2000, FRESH_AFTER_MS = 5000;
  const CHAT_AFTER_MS = 10000, RETRY_EVERY_MS = 5000, FIRST_GRACE_MS = 3000;
  const DROP_AFTER_MS = 32000; // 30 s, plus the 2 s between pings: never declared early
  const LABELS = {
    video: "Video", audio_only: "Audio only (weak link): video comes back by itself",
    ice_restart: "Connection lost: reconnecting (ICE restart)…",
    fresh_pc: "Connection lost: reconnecting (new connection)…",
    chat_only: "Media lost: use the chat below; the call keeps retrying",
  };
  const $ = (id) => document.getElementById(id);

  // What tests and the status line read.
  const state = window.consult = {
    me: null, step: "connecting", joinMs: null, fps: 0, framesDecoded: 0, ladder: [],
    chat: [], remoteSteps: {}, peers: {}, roster: [],
  };
  let iceServers = [], floorKbps = Number(root.dataset.floor) || 150;
  // TURN credentials come only with admission: a guest in the lobby has none, and fetches
  // them (POST /enter) when let in; signals arriving meanwhile wait for them.
  let iceLoaded = false, iceReady = null;
  let localStream = null, cameraTrack = null, screenTrack = null, source = null;
  let joinStart = 0, samples = [];
  // Generations start at the page's load time, so a reloaded page outranks its old self.
  const EPOCH = Date.now();

  async function post(path, body) {
    const r = await fetch(`/consults/${cid}${path}`, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, "X-Background": "1" },
      body: JSON.stringify(body || {}),
    });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(data.error || r.statusText);
    return data;
  }

  // -- device check -----------------------------------------------------------------------------
  async function deviceCheck() {
    try {
      localStream = await navigator.mediaDevices.getUserMedia({
        audio: true, video: { width: 640, height: 480, frameRate: 30 } });
      cameraTrack = localStream.getVideoTracks()[0] || null;
      $("preview").srcObject = localStream;
      const s = cameraTrack && cameraTrack.getSettings();
      $("check-camera").textContent = cameraTrack ? `ok (${s.width}×${s.height})` : "none found";
      $("check-mic").textContent = localStream.getAudioTracks().length ? "ok" : "none found";
      meterMic();
    } catch (e) {
      $("check-camera").textContent = "not available: " + e.name;
      $("check-mic").textContent = "not available";
      localStream = new MediaStream();
    }
    try {
      const t0 = performance.now();
      await fetch("/livez", { cache: "no-store" });
      $("check-net").textContent = `ok (${Math.round(performance.now() - t0)} ms to the appliance)`;
    } catch (e) {
      $("check-net").textContent = "the appliance is not reachable";
    }
    $("join").disabled = false;
  }

  function meterMic() {
    if (!localStream.getAudioTracks().length || !window.AudioContext) return;
    try {
      const ctx = new AudioContext(), an = ctx.createAnalyser(), buf = new Uint8Array(256);
      ctx.createMediaStreamSource(localStream).connect(an);
      setInterval(() => {
        an.getByteTimeDomainData(buf);
        let peak = 0;
        for (const v of buf) peak = Math.max(peak, Math.abs(v - 128) / 128);
        $("mic-level").value = peak;
      }, 200);
    } catch (e) { /* the meter is a nicety */ }
  }

  // -- joining -----------------------------------------------------------------------------------
  async function join() {
    $("join").disabled = true;
    joinStart = performance.now();
    const info = await post("/join");
    state.me = info.participant;
    state.seat = info.seat;
    iceServers = info.ice_servers;
    iceLoaded = info.state === "admitted";
    if (iceLoaded && root.dataset.titled !== "true") post("/enter").then(showTitle).catch(() => {});
    floorKbps = info.video_floor_kbit_s || floorKbps;
    $("check").hidden = true;
    for (const m of info.chat || []) showChat({ id: m.id, sender: m.sender, body: m });
    openEvents(info.cursor);
    if (info.state === "lobby") $("lobby").hidden = false;
    onRoster(info.roster);
  }

  function enterFromLobby() {
    if (iceReady) return;
    iceReady = post("/enter").then((info) => {
      iceServers = info.ice_servers;
      iceLoaded = true;
      showTitle(info);
      iceReady = null;
      onRoster(state.roster);
    });
    iceReady.catch((e) => { iceReady = null; console.warn("enter", e); });
  }

  // The page names the consult only once its viewer is in the call (the title is often the
  // patient's name): a guest let in from the lobby learns it from /enter.
  function showTitle(info) {
    if (root.dataset.titled === "true") return;
    root.dataset.titled = "true";
    $("consult-title").textContent = info.title;
    root.dataset.study = info.study_uid || "";
  }

  function enterCall() {
    if (!$("call").hidden) return;
    $("lobby").hidden = true;
    $("call").hidden = false;
    $("local").srcObject = localStream;
    joinStart = performance.now(); // admitted: connecting starts now
    setStep("connecting");
    setInterval(tick, TICK_MS);
    setInterval(flushSamples, POST_MS);
  }

  function openEvents(after) {
    // Only what happens from now on; the chat so far came with the join answer.
    source = new EventSource(`/consults/${cid}/events?after=${after || 0}`);
    const alive = () => { state.appChannelAt = performance.now(); };
    if (!state.appChannelAt) alive(); // reopening is not hearing from the server
    source.onopen = alive;
    source.addEventListener("ping", alive);
    source.onmessage = (m) => {
      alive();
      const ev = JSON.parse(m.data);
      state.cursor = Math.max(state.cursor || 0, ev.id);
      onEvent(ev);
    };
    state.cursor = Math.max(state.cursor || 0, after || 0);
    state.reopenedAt = performance.now();
    source.addEventListener("gone", () => { source.close(); closeAll(); setStep("left"); });
  }

  function onEvent(ev) {
    if (ev.kind === "presence") onRoster(ev.body.roster);
    else if (ev.kind === "signal") {
      const handle = () => onSignal(ev.sender, ev.body).catch((e) => console.warn(e));
      if (iceReady) iceReady.then(handle, () => {}); else handle();
    }
    else if (ev.kind === "chat") showChat(ev);
    else if (ev.kind === "ladder" && ev.sender !== state.me) showRemote(ev);
    else if (ev.kind === "system" && ev.body.ended) { setStep("ended"); closeAll(); }
    else if (ev.kind === "system" && ev.body.relay_refused) showRelayRefusal(ev.body.relay_refused);
  }

  function onRoster(roster) {
    state.roster = roster;
    const rec = $("recording");
    if (rec) rec.hidden = !roster.some((p) => p.kind === "media" && p.role === "recorder");
    const mine = roster.find((p) => p.id === state.me);
    if (mine && mine.state === "admitted" && !iceLoaded) { enterFromLobby(); return; }
    if (mine && mine.state === "admitted") enterCall();
    if (!mine || mine.state !== "admitted") return;
    const others = roster.filter((p) => p.state === "admitted" && p.id !== state.me);
    for (const p of others) if (!state.peers[p.id]) makePeer(p.id, EPOCH, p.kind);
    for (const id of Object.keys(state.peers)) {
      if (!others.some((p) => p.id === Number(id))) dropPeer(Number(id));
    }
    if (isHost) showWaiting(roster.filter((p) => p.state === "lobby"));
    if (isHost) showPeople(others.filter((p) => p.kind !== "media"));
  }

  // -- peers ---------------------------------------------------------------------------------------
  function makePeer(id, gen, kind) {
    const old = state.peers[id];
    if (old) old.pc.close();
    const pc = new RTCPeerConnection({ iceServers, iceTransportPolicy: relayOnly ? "relay" : "all" });
    const now = performance.now();
    const peer = {
      id, gen, pc, polite: state.me > id,
      kind: kind || (old && old.kind) || (state.roster.find((p) => p.id === id) || {}).kind || "user",
      makingOffer: false, ignoreOffer: false, bytes: 0,
      lastMedia: old ? old.lastMedia : now + FIRST_GRACE_MS,
      hadMedia: old ? old.hadMedia : false, stage: old ? old.stage : "ok",
      stageAt: old ? old.stageAt : now, outageAt: old ? old.outageAt : 0, badSince: 0,
      goodSince: 0, audioOnly: false, frames: 0, framesAt: now, lastRetry: now,
      video: old ? old.video : null, bornAt: old ? old.bornAt : now,
    };
    // The appliance's probe never acts on the ladder: the browser does.
    peer.actor = !peer.polite || peer.kind === "media";
    state.peers[id] = peer;
    for (const t of localStream.getTracks()) {
      const track = t.kind === "video" && screenTrack ? screenTrack : t;
      pc.addTrack(track, localStream);
    }
    pc.onnegotiationneeded = async () => {
      try {
        peer.makingOffer = true;
        await pc.setLocalDescription();
        send(peer, { description: pc.localDescription });
      } catch (e) { console.warn(e); } finally { peer.makingOffer = false; }
    };
    // Candidates go in small batches: each signal is a durable row, so fewer is faster.
    peer.pending = [];
    pc.onicecandidate = (e) => {
      if (!e.candidate) return;
      peer.pending.push(e.candidate);
      if (peer.pending.length === 1) {
        setTimeout(() => send(peer, { candidates: peer.pending.splice(0) }), 30);
      }
    };
    pc.ontrack = (e) => attachRemote(peer, e.track, e.streams[0]);
    return peer;
  }

  function dropPeer(id) {
    const peer = state.peers[id];
    if (!peer) return;
    peer.pc.close();
    if (peer.video) peer.video.remove();
    delete state.peers[id];
  }

  function closeAll() { for (const id of Object.keys(state.peers)) dropPeer(Number(id)); }

  function send(peer, data) {
    if (noDirect && peer.kind !== "media") {
      if (data.candidates) return;
      if (data.description) {
        const sdp = data.description.sdp.split("\r\n").filter((l) => !l.startsWith("a=candidate"))
          .join("\r\n");
        data = Object.assign({}, data, { description: { type: data.description.type, sdp } });
      }
    }
    post("/signal", { to: peer.id, data: Object.assign({ gen: peer.gen }, data) })
      .catch((e) => console.warn("signal", e));
  }

  async function onSignal(from, data) {
    let peer = state.peers[from];
    const gen = Number(data.gen || 0);
    if (!peer || gen > peer.gen) peer = makePeer(from, gen);
    else if (gen < peer.gen) return; // from a connection already replaced
    const pc = peer.pc;
    if (data.error) { showRelayRefusal(data.error); return; }
    if (data.description) {
      const collision = data.description.type === "offer" &&
        (peer.makingOffer || pc.signalingState !== "stable");
      peer.ignoreOffer = !peer.polite && collision;
      if (peer.ignoreOffer) return;
      await pc.setRemoteDescription(data.description);
      if (data.description.type === "offer") {
        await pc.setLocalDescription();
        send(peer, { description: pc.localDescription });
      }
    } else if (data.candidates || data.candidate) {
      for (const c of data.candidates || [data.candidate]) {
        try { await pc.addIceCandidate(c); } catch (e) {
          if (!peer.ignoreOffer) console.warn(e);
        }
      }
    }
  }

  function attachRemote(peer, track, stream) {
    if (!peer.video) {
      peer.video = document.createElement("video");
      peer.video.autoplay = true;
      peer.video.playsInline = true;
      peer.video.dataset.peer = String(peer.id);
      peer.video.dataset.testid = "remote-video";
      $("remotes").appendChild(peer.video);
    }
    const ms = stream || new MediaStream([track]);
    if (peer.video.srcObject !== ms) peer.video.srcObject = ms;
    if (track.kind === "video" && state.joinMs === null && peer.video.requestVideoFrameCallback) {
      peer.video.requestVideoFrameCallback(() => {
        if (state.joinMs !== null) return;
        // Join time: from the moment both sides are in the room to the first remote frame.
        state.joinMs = Math.round(performance.now() - Math.max(joinStart, peer.bornAt));
        post("/ladder", { step: "joined", join_ms: state.joinMs, peer: peer.id }).catch(() => {});
      });
    }
  }

  // -- the ladder -------------------------------------------------------------------------------------
  function setStep(step) {
    state.step = step;
    const el = $("status");
    if (!el) return;
    el.textContent = LABELS[step] || ({ connecting: "Connecting…", ended: "The consult has ended",
      left: "You left the consult" })[step] || step;
    el.className = "ladder " + (step === "video" ? "" : step === "audio_only" ? "degraded" : "down");
    $("chat").classList.toggle("prominent", step === "chat_only");
  }

  function report(peer, step, extra) {
    const entry = Object.assign({ step, at: Date.now(), peer: peer.id, gen: peer.gen }, extra || {});
    state.ladder.push(entry);
    post("/ladder", Object.assign({ step, peer: peer.id, gen: peer.gen }, extra || {}))
      .catch(() => {}); // the server may be unreachable too; the local step still holds
  }

  function relayPeer() {
    return Object.values(state.peers).find((p) => p.kind === "media" &&
      (state.roster.find((r) => r.id === p.id) || {}).role === "relay");
  }

  // Media lost for good with someone: ask the appliance to relay (once a minute at most).
  function askRelay(now) {
    if (relayPeer() || now - (state.relayAskedAt || -RELAY_ASK_EVERY_MS) < RELAY_ASK_EVERY_MS) return;
    state.relayAskedAt = now;
    post("/relay", {}).catch((e) => showRelayRefusal(e.message));
  }

  function showRelayRefusal(message) {
    state.relayRefused = message;
    const el = $("remote-status");
    if (el) el.textContent = message;
  }

  function worstStep() {
    const order = ["video", "audio_only", "ice_restart", "fresh_pc", "chat_only"];
    const relay = relayPeer();
    if (relay && relay.hadMedia && performance.now() - relay.lastMedia < TICK_MS * 2) {
      return "video"; // the other side reaches us through the appliance's relay
    }
    let worst = "connecting";
    for (const peer of Object.values(state.peers)) {
      if (peer.kind === "media" || (!peer.hadMedia && peer.stage === "ok")) continue;
      const s = peer.stage === "ok" ? (peer.audioOnly ? "audio_only" : "video") : peer.stage;
      if (worst === "connecting" || order.indexOf(s) > order.indexOf(worst)) worst = s;
    }
    return worst;
  }

  async function readStats(peer) {
    const stats = await peer.pc.getStats();
    let bytes = 0, frames = 0, jitter = null, rtt = null, outKbps = null, loss = null;
    let pairId = null;
    const pairs = {};
    stats.forEach((r) => {
      if (r.type === "inbound-rtp") {
        bytes += r.bytesReceived || 0;
        if (r.kind === "video") frames = r.framesDecoded || 0;
        if (r.jitter != null) jitter = Math.max(jitter || 0, r.jitter * 1000);
      } else if (r.type === "remote-inbound-rtp" && r.kind === "video" && r.fractionLost != null) {
        loss = r.fractionLost;
      } else if (r.type === "transport" && r.selectedCandidatePairId) {
        pairId = r.selectedCandidatePairId;
      } else if (r.type === "candidate-pair") {
        pairs[r.id] = r;
      }
    });
    const pair = pairs[pairId] || Object.values(pairs).find((p) => p.nominated && p.state === "succeeded");
    if (pair) {
      if (pair.currentRoundTripTime != null) rtt = pair.currentRoundTripTime * 1000;
      if (pair.availableOutgoingBitrate != null) outKbps = pair.availableOutgoingBitrate / 1000;
    }
    return { bytes, frames, jitter, rtt, outKbps, loss };
  }

  async function tickPeer(peer, now) {
    let s;
    try { s = await readStats(peer); } catch (e) { return; }
    if (s.bytes > peer.bytes) {
      peer.lastMedia = now;
      if (!peer.hadMedia) peer.hadMedia = true;
    }
    const kbps = ((s.bytes - peer.bytes) * 8) / TICK_MS;
    peer.bytes = s.bytes;
    if (now - peer.framesAt >= SAMPLE_MS) {
      peer.fps = ((s.frames - peer.frames) * 1000) / (now - peer.framesAt);
      peer.frames = s.frames;
      peer.framesAt = now;
      state.fps = peer.fps;
      state.framesDecoded = s.frames;
      samples.push({ ts: Date.now() / 1000, peer: peer.id, loss: s.loss, jitter_ms: s.jitter,
        rtt_ms: s.rtt, fps: Math.round(peer.fps * 10) / 10, kbit_s: Math.round(kbps),
        step: worstStep() === "connecting" ? "" : worstStep() });
    }
    if (peer.kind === "media") return; // the appliance's probe/recorder sends nothing back
    const gap = now - peer.lastMedia;
    // Media is flowing (again).
    if (gap < TICK_MS * 2) {
      if (peer.stage !== "ok") {
        report(peer, "video", { after_ms: Math.round(now - peer.outageAt) });
        peer.stage = "ok";
      }
      audioLadder(peer, s, now);
      return;
    }
    if (!peer.hadMedia && peer.stage === "ok" && gap < 0) return; // still joining
    if (peer.stage === "ok" && gap > RESTART_AFTER_MS) {
      peer.outageAt = peer.lastMedia;
      peer.stage = "ice_restart";
      peer.stageAt = now;
      report(peer, "ice_restart", { after_ms: Math.round(gap) });
      if (peer.actor) peer.pc.restartIce();
    } else if (peer.stage === "ice_restart" && now - peer.stageAt > FRESH_AFTER_MS) {
      peer.stage = "fresh_pc";
      peer.stageAt = now;
      report(peer, "fresh_pc", { after_ms: Math.round(now - peer.outageAt) });
      if (peer.actor) freshPeer(peer);
    } else if (peer.stage === "fresh_pc" && now - peer.outageAt > CHAT_AFTER_MS) {
      peer.stage = "chat_only";
      peer.stageAt = now;
      report(peer, "chat_only", { after_ms: Math.round(now - peer.outageAt) });
      askRelay(now);
    } else if (peer.stage === "chat_only" && peer.actor && now - peer.lastRetry > RETRY_EVERY_MS) {
      freshPeer(peer);
    }
  }

  function freshPeer(peer) {
    const next = makePeer(peer.id, peer.gen + 1);
    next.lastRetry = performance.now();
    send(next, { reset: true }); // the other side starts generation gen+1 too
  }

  // Audio only: with video off the send estimate cannot climb back (nothing probes it), so
  // video is tried again on its own: after 10 s of low loss, then 20 s, 40 s, up to 60 s while
  // trials keep failing. During a trial's first 15 s only loss can send it back down (the
  // estimate needs time to ramp up).
  function audioLadder(peer, s, now) {
    const lossBad = s.loss !== null && s.loss > 0.1, lossOk = s.loss === null || s.loss < 0.03;
    const lowRate = s.outKbps !== null && s.outKbps < floorKbps && now > (peer.trialUntil || 0);
    const weak = lossBad || lowRate;
    const good = lossOk && (s.outKbps === null || s.outKbps >= floorKbps * 1.2);
    peer.badSince = weak ? (peer.badSince || now) : 0;
    peer.goodSince = good ? (peer.goodSince || now) : 0;
    peer.lossOkSince = lossOk ? (peer.lossOkSince || now) : 0;
    if (!peer.audioOnly && peer.badSince && now - peer.badSince >= AUDIO_AFTER_MS) {
      peer.audioOnly = true;
      const failedTrial = peer.videoAt && now - peer.videoAt < 30000;
      peer.trialMs = failedTrial ? Math.min((peer.trialMs || 10000) * 2, 60000) : 10000;
      peer.audioAt = now;
      setVideoActive(peer, false);
      report(peer, "audio_only", { after_ms: Math.round(now - peer.badSince) });
    } else if (peer.audioOnly && ((peer.goodSince && now - peer.goodSince >= AUDIO_AFTER_MS) ||
               (peer.lossOkSince && now - peer.audioAt >= peer.trialMs &&
                now - peer.lossOkSince >= AUDIO_AFTER_MS))) {
      peer.audioOnly = false;
      peer.videoAt = now;
      peer.trialUntil = now + 15000;
      peer.badSince = 0;
      setVideoActive(peer, true);
      report(peer, "video", { after_ms: Math.round(now - peer.audioAt) });
    }
  }

  function setVideoActive(peer, active) {
    for (const sender of peer.pc.getSenders()) {
      if (!sender.track || sender.track.kind !== "video") continue;
      const p = sender.getParameters();
      (p.encodings || []).forEach((e) => { e.active = active; });
      sender.setParameters(p).catch((e) => console.warn(e));
    }
  }

  function tick() {
    const now = performance.now();
    Promise.all(Object.values(state.peers).map((p) => tickPeer(p, now))).then(() => {
      checkDropped(now);
      checkChannel(now);
      const step = worstStep();
      if (step !== state.step && !["ended", "left"].includes(state.step)) setStep(step);
    });
  }

  // A call is dropped only when every channel is gone for over 30 s: media down and the
  // app's channel (chat, signaling) silent too. Reported when the channel is back.
  // A silent channel (pings come every 2 s) is reopened every 5 s on a fresh connection, so
  // it is back soon after the network is, instead of after TCP's retransmission backoff.
  function checkChannel(now) {
    if (!source || state.step === "left" || state.step === "ended") return;
    if (now - state.appChannelAt > 6000 && now - state.reopenedAt > 5000) {
      source.close();
      openEvents(state.cursor);
    }
  }

  function checkDropped(now) {
    const peers = Object.values(state.peers).filter((p) => p.kind !== "media" && p.hadMedia);
    const mediaDown = peers.length && peers.every((p) => p.stage !== "ok");
    const appDown = now - (state.appChannelAt || now) > DROP_AFTER_MS;
    if (mediaDown && appDown && !state.droppedAt) {
      state.droppedAt = now;
      const el = $("status");
      if (el) el.textContent = "Call dropped: every channel is down; still retrying";
    } else if (state.droppedAt && !appDown) {
      const peer = peers[0] || { id: 0, gen: 0 };
      report(peer, "dropped", { after_ms: Math.round(now - state.droppedAt + DROP_AFTER_MS) });
      state.droppedAt = 0;
    }
  }

  function flushSamples() {
    if (!samples.length) return;
    const batch = samples.splice(0, 100);
    post("/stats", { samples: batch }).catch(() => {}); // lost with the link: they are samples
  }

  function showRemote(ev) {
    if (ev.body.step === "joined") return;
    state.remoteSteps[ev.sender] = ev.body.step;
    const el = $("remote-status");
    if (el) el.textContent = `${ev.body.name}: ${LABELS[ev.body.step] || ev.body.step}`;
  }

  // -- chat ------------------------------------------------------------------------------------------
  function showChat(ev) {
    state.chat.push({ id: ev.id, text: ev.body.text, name: ev.body.name, sender: ev.sender,
      receivedAt: Date.now() });
    const li = document.createElement("li");
    li.dataset.testid = "message";
    const who = document.createElement("b");
    who.textContent = ev.body.name + ": ";
    li.append(who, document.createTextNode(ev.body.text));
    $("messages").appendChild(li);
    li.scrollIntoView({ block: "nearest" });
  }

  $("chat-form") && $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("chat-text").value.trim();
    if (!text) return;
    post("/chat", { text }).then(() => { $("chat-text").value = ""; })
      .catch((err) => alert("Not sent: " + err.message));
  });
  state.sendChat = (text) => post("/chat", { text });

  // -- host: lobby, invite, consent, end ----------------------------------------------------------
  function showWaiting(waiting) {
    const box = $("waiting");
    if (!box) return;
    box.replaceChildren();
    for (const p of waiting) {
      const row = document.createElement("p");
      const b = document.createElement("button");
      b.textContent = "Admit";
      b.dataset.testid = "admit";
      b.onclick = () => post(`/admit/${p.id}`, { allow: true }).catch((e) => alert(e.message));
      row.append(document.createTextNode(`${p.name} is waiting in the lobby `), b);
      box.appendChild(row);
    }
  }

  // The host may take anyone out: their secret stops working and their stream ends.
  function showPeople(people) {
    const box = $("people");
    if (!box) return;
    box.replaceChildren();
    for (const p of people) {
      const row = document.createElement("p");
      const b = document.createElement("button");
      b.textContent = "Remove";
      b.className = "secondary";
      b.dataset.testid = "remove";
      b.onclick = () => {
        if (confirm(`Remove ${p.name} from the consult?`)) {
          post(`/remove/${p.id}`).catch((e) => alert(e.message));
        }
      };
      row.append(document.createTextNode(`${p.name} is in the call `), b);
      box.appendChild(row);
    }
  }

  function hostButtons() {
    if (!isHost) return;
    $("invite").onclick = async () => {
      const r = await post("/invite");
      $("invite-url").hidden = false;
      $("invite-url").value = r.url;
      $("invite-url").select();
    };
    $("revoke-invites").onclick = () => {
      if (!confirm("Withdraw every invite link of this consult?")) return;
      post("/invites/revoke").then((r) => {
        $("invite-url").hidden = true;
        alert(`${r.revoked} link(s) withdrawn; guests already in the call stay until removed.`);
      }).catch((e) => alert(e.message));
    };
    $("consent").onclick = () => post("/consent").then(() => {
      $("consent").disabled = true;
      $("record").disabled = false;
    });
    // The appliance's media service joins as a receive-only recorder; it shows in the roster.
    $("record").onclick = () => {
      const on = $("record").dataset.on === "1";
      post(on ? "/recording/stop" : "/recording", {}).then(() => {
        $("record").dataset.on = on ? "0" : "1";
        $("record").textContent = on ? "Record" : "Stop recording";
      }).catch((e) => alert(e.message));
    };
    $("end").onclick = () => { if (confirm("End the consult for everyone?")) post("/end"); };
  }

  // -- screen share -----------------------------------------------------------------------------------
  async function shareScreen() {
    if (screenTrack) { stopShare(); return; }
    const display = await navigator.mediaDevices.getDisplayMedia({ video: true });
    screenTrack = display.getVideoTracks()[0];
    screenTrack.onended = stopShare;
    replaceVideo(screenTrack);
    $("share").textContent = "Stop sharing";
  }

  function stopShare() {
    if (screenTrack) screenTrack.stop();
    screenTrack = null;
    replaceVideo(cameraTrack);
    $("share").textContent = "Share screen (CT)";
  }

  function replaceVideo(track) {
    for (const peer of Object.values(state.peers)) {
      for (const sender of peer.pc.getSenders()) {
        if (sender.track && sender.track.kind === "video") {
          sender.replaceTrack(track).catch((e) => console.warn(e));
        }
      }
    }
  }

  $("join").addEventListener("click", () => join().catch((e) => {
    $("join").disabled = false;
    alert("Could not join: " + e.message);
  }));
  $("share").addEventListener("click", () => shareScreen().catch((e) => console.warn(e)));
  $("leave").addEventListener("click", () => post("/leave", { seat: state.seat }).then(() => {
    closeAll();
    if (source) source.close();
    setStep("left");
  }));
  window.addEventListener("pagehide", () => {
    if (state.me) fetch(`/consults/${cid}/leave`, {
      method: "POST", keepalive: true, credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf, "Content-Type": "application/json" },
      body: JSON.stringify({ seat: state.seat }) });
  });
  hostButtons();
  deviceCheck();
})();
