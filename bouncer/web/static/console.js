// The console refreshes itself: every few seconds it fetches its own page again and swaps each
// live section (data-live) for the new one, leaving alone a section whose form is being typed in.
(function () {
  "use strict";
  var every = (Number(document.body.dataset.refresh) || 10) * 1000;

  function typingIn(section) {
    var active = document.activeElement;
    return active && section.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName);
  }

  function swap(fresh) {
    document.querySelectorAll("[data-live]").forEach(function (section) {
      var replacement = section.id && fresh.getElementById(section.id);
      if (replacement && !typingIn(section)) {
        section.replaceWith(document.importNode(replacement, true));
      }
    });
  }

  function stale(yes) {
    var banner = document.getElementById("stale");
    if (banner) banner.hidden = !yes;
  }

  function refresh() {
    // location.origin never carries credentials, so fetch accepts the URL.
    var url = location.origin + location.pathname + location.search;
    return fetch(url, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        swap(new DOMParser().parseFromString(html, "text/html"));
        stale(false);
        document.dispatchEvent(new CustomEvent("console:refreshed"));
      })
      .catch(function () { stale(true); });
  }

  window.consoleRefresh = refresh;
  setInterval(refresh, every);
})();
