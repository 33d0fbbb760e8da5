// Live refresh: re-fetch the page's live region every data-refresh seconds and swap it in.
// The region is server-rendered (autoescaped) HTML from this origin; nothing else is loaded.
(function () {
  "use strict";
  var box = document.getElementById("live");
  if (!box) { return; }
  var src = box.getAttribute("data-src");
  var every = Math.max(1, parseFloat(box.getAttribute("data-refresh")) || 5) * 1000;
  var status = document.getElementById("live-status");
  var busy = false;
  var refreshes = 0;

  function say(text, stale) {
    if (!status) { return; }
    status.textContent = text;
    status.parentNode.classList.toggle("stale", !!stale);
  }

  function tick() {
    if (busy || document.hidden) { return; }
    busy = true;
    fetch(src, { credentials: "same-origin", cache: "no-store", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (r.status === 401) {  // the session ended (logout elsewhere, expiry, revoked key)
          window.location.assign("/dashboard/login?next=" + encodeURIComponent(window.location.pathname + window.location.search));
          return null;
        }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        if (html === null) { return; }
        box.innerHTML = html;
        refreshes += 1;
        box.setAttribute("data-refreshes", String(refreshes));
        say("live: updated " + new Date().toLocaleTimeString(), false);
      })
      .catch(function (e) { say("live: update failed (" + e.message + "), retrying", true); })
      .then(function () { busy = false; });
  }

  window.setInterval(tick, every);
  document.addEventListener("visibilitychange", function () { if (!document.hidden) { tick(); } });
})();
