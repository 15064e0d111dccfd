// Click a figure to see it at full size (its natural size, scrollable); click again or press Escape to close.
// Local and dependency-free: the book is read offline.
(function () {
  function close(layer) {
    if (layer && layer.parentNode) layer.parentNode.removeChild(layer);
  }
  function open(img) {
    var layer = document.createElement("div");
    layer.className = "atlas-zoom";
    layer.setAttribute("role", "dialog");
    layer.setAttribute("aria-label", "figure at full size (click or Escape to close)");
    var big = document.createElement("img");
    big.src = img.currentSrc || img.src;
    big.alt = img.alt || "";
    // Figures are drawn to fit the text column at 100%: show them 1.5 times as large, or as wide as the
    // window when that is larger (scroll on a phone).
    var natural = img.naturalWidth || img.width;
    big.width = Math.round(Math.max(natural * 1.5, window.innerWidth * 0.95));
    layer.appendChild(big);
    layer.addEventListener("click", function () { close(layer); });
    document.addEventListener("keydown", function esc(e) {
      if (e.key === "Escape") { close(layer); document.removeEventListener("keydown", esc); }
    });
    document.body.appendChild(layer);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll(".bd-article figure img").forEach(function (img) {
      img.classList.add("atlas-zoomable");
      img.addEventListener("click", function (e) { e.preventDefault(); open(img); });
    });
  });
})();
