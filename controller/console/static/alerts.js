// Alerts pages (alerts_web.py), a few lines of our own: the CSP allows no inline script and no library is needed.
// - The list: an EventSource on the table's data-stream swaps each changed row by id (a newer version only),
//   inserts a new one in list order on the first page, and removes one that no longer passes the filter.
//   A row ticked for an incident report keeps its tick when it is swapped.
// - The sound toggle: off by default, the choice kept in this browser; a short beep (WebAudio) when a new
//   critical or high alert appears.
// - The wall board: its figures are fetched again every few seconds.
"use strict";
(function () {
  var SOUND_KEY = "sekisho.alerts.sound";
  var audio = null;

  function soundOn() {
    try { return window.localStorage.getItem(SOUND_KEY) === "on"; } catch (e) { return false; }
  }

  function beep() {
    if (!soundOn()) { return; }
    var Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) { return; }
    audio = audio || new Context();
    if (audio.state === "suspended") { audio.resume(); }
    var tone = audio.createOscillator();
    var gain = audio.createGain();
    tone.frequency.value = 880;
    gain.gain.value = 0.2;
    tone.connect(gain);
    gain.connect(audio.destination);
    tone.start();
    tone.stop(audio.currentTime + 0.35);
  }

  function setupSound() {
    var button = document.getElementById("alerts-sound");
    if (!button) { return; }
    function show() {
      var on = soundOn();
      button.setAttribute("aria-pressed", on ? "true" : "false");
      button.textContent = on ? button.dataset.labelOn : button.dataset.labelOff;
    }
    button.hidden = false;
    show();
    button.addEventListener("click", function () {
      try { window.localStorage.setItem(SOUND_KEY, soundOn() ? "off" : "on"); } catch (e) { return; }
      var Context = window.AudioContext || window.webkitAudioContext;
      // Created on this click: browsers let a page play sound only after a user gesture.
      if (soundOn() && Context) { audio = audio || new Context(); audio.resume(); }
      show();
    });
  }

  // List order: [group, rank, last seen ms, id]; unresolved, severity, newest, larger id first.
  function before(a, b) {
    if (a[0] !== b[0]) { return a[0] < b[0]; }
    if (a[1] !== b[1]) { return a[1] < b[1]; }
    if (a[2] !== b[2]) { return a[2] > b[2]; }
    return a[3] > b[3];
  }

  function keyOf(row) {
    return (row.dataset.key || "").split(",").map(Number);
  }

  function rowFrom(html) {
    var holder = document.createElement("template");
    holder.innerHTML = html.trim();
    return holder.content.firstElementChild;
  }

  function setupList() {
    var table = document.getElementById("alerts-table");
    var body = document.getElementById("alerts-rows");
    var live = document.getElementById("alerts-live");
    if (!table || !body || !window.EventSource || !table.dataset.stream) { return; }
    var insert = table.dataset.insert === "yes";
    var source = new EventSource(table.dataset.stream);

    source.addEventListener("open", function () {
      if (live) { live.textContent = live.dataset.live; }
    });
    source.addEventListener("error", function () {
      // EventSource reconnects by itself (with the last event id); the hint says so meanwhile.
      if (live) { live.textContent = live.dataset.lost; }
    });
    source.addEventListener("alert", function (message) {
      var change = JSON.parse(message.data);
      var current = document.getElementById("alert-" + change.id);
      if (current && Number(current.dataset.version) >= change.version) { return; }
      var row = rowFrom(change.html);
      if (!row) { return; }
      if (current) {
        // A row ticked for an incident report stays ticked (and focused) when its newer version replaces it.
        var picked = current.querySelector("input[form='incident-pick']");
        var fresh = row.querySelector("input[form='incident-pick']");
        var focused = picked !== null && document.activeElement === picked;
        if (picked && fresh) { fresh.checked = picked.checked; }
        current.replaceWith(row);
        if (focused && fresh) { fresh.focus(); }
        return;
      }
      if (!insert) { return; }
      var empty = body.querySelector(".alerts-empty");
      if (empty) { empty.remove(); }
      var key = change.key;
      var next = Array.prototype.find.call(body.querySelectorAll("tr[data-alert-id]"), function (other) {
        return before(key, keyOf(other));
      });
      body.insertBefore(row, next || null);
      if (change.state === "open" && (change.severity === "critical" || change.severity === "high")) { beep(); }
    });
    source.addEventListener("gone", function (message) {
      var change = JSON.parse(message.data);
      var current = document.getElementById("alert-" + change.id);
      if (current) { current.remove(); }
    });
  }

  function setupBoard() {
    var board = document.querySelector("[data-refresh]");
    var target = document.getElementById("board-live");
    if (!board || !target || !window.fetch) { return; }
    var every = Math.max(2, Number(board.dataset.refreshS) || 5) * 1000;
    window.setInterval(function () {
      window.fetch(board.dataset.refresh, { credentials: "same-origin", redirect: "error" })
        .then(function (answer) { return answer.ok ? answer.text() : null; })
        .then(function (html) { if (html !== null) { target.innerHTML = html; } })
        .catch(function () { /* the next round tries again */ });
    }, every);
  }

  document.addEventListener("DOMContentLoaded", function () {
    setupSound();
    setupList();
    setupBoard();
  });
})();
