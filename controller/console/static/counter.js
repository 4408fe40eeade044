// The key counter: the borrower signs on a canvas; on submit the drawing goes into a hidden field as a PNG
// data URL. Our own few lines (the CSP allows no inline script and no library is needed).
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var canvas = document.getElementById("c-signature-pad");
  var field = document.getElementById("c-signature");
  var form = document.getElementById("lend-form");
  if (!canvas || !field || !form) { return; }
  var ctx = canvas.getContext("2d");
  var drawing = false;
  var drawn = false;
  ctx.lineWidth = 3;
  ctx.lineCap = "round";
  ctx.strokeStyle = "#000";

  function point(event) {
    var box = canvas.getBoundingClientRect();
    return {
      x: (event.clientX - box.left) * (canvas.width / box.width),
      y: (event.clientY - box.top) * (canvas.height / box.height)
    };
  }
  canvas.addEventListener("pointerdown", function (event) {
    drawing = true;
    canvas.setPointerCapture(event.pointerId);
    var p = point(event);
    ctx.beginPath();
    ctx.moveTo(p.x, p.y);
    event.preventDefault();
  });
  canvas.addEventListener("pointermove", function (event) {
    if (!drawing) { return; }
    var p = point(event);
    ctx.lineTo(p.x, p.y);
    ctx.stroke();
    drawn = true;
    event.preventDefault();
  });
  function stop() { drawing = false; }
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
  document.querySelectorAll("[data-signature-clear]").forEach(function (button) {
    button.addEventListener("click", function () {
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      drawn = false;
      field.value = "";
    });
  });
  form.addEventListener("submit", function (event) {
    if (!drawn) {
      event.preventDefault();
      canvas.focus();
      return;
    }
    field.value = canvas.toDataURL("image/png");
  });
});
