// The live tail: the server sends each new event as a table row it has
// rendered (and escaped); this only puts the rows at the top.
(function () {
  var box = document.querySelector("[data-tail]");
  var body = document.getElementById("tail");
  var status = document.getElementById("tail-status");
  if (!box || !body || !window.EventSource) return;
  var source = new EventSource(box.getAttribute("data-tail"));
  function show(text, kind) {
    status.textContent = text;
    status.className = "badge " + kind;
  }
  source.onopen = function () { show("live", "ok"); };
  source.onerror = function () { show("reconnecting…", "bad"); };
  source.addEventListener("event", function (e) {
    var t = document.createElement("tbody");
    t.innerHTML = e.data;
    var row = t.firstElementChild;
    if (!row || document.getElementById(row.id)) return;
    row.classList.add("fresh");
    body.insertBefore(row, body.firstChild);
    while (body.children.length > 200) body.removeChild(body.lastChild);
  });
})();
