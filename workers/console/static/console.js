// sessionq console: live updates. Pages read fine without this script; with it, an
// element with data-refresh reloads its inner HTML from that URL every data-every seconds
// (polling, paused while the tab is hidden).
(function () {
  "use strict";
  document.querySelectorAll("[data-refresh]").forEach(function (el) {
    var url = el.getAttribute("data-refresh");
    var every = Math.max(1, parseInt(el.getAttribute("data-every") || "5", 10)) * 1000;
    var busy = false;
    function tick() {
      if (busy || document.hidden) return;
      busy = true;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) {
          if (r.redirected || !r.ok) throw new Error("refresh: HTTP " + r.status);
          return r.text();
        })
        .then(function (html) { el.innerHTML = html; el.removeAttribute("data-stale"); })
        .catch(function () { el.setAttribute("data-stale", "1"); })
        .finally(function () { busy = false; });
    }
    setInterval(tick, every);
  });
})();
