// Media register page: the Print button, and htmx swapping a refused lend/return (422) in place so its reason
// shows where the form was (htmx 2 swaps only 2xx by default). A few lines of our own; the CSP forbids inline
// scripts. Without htmx the forms post normally and the page comes back with the reason.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("[data-print]").forEach(function (button) {
    button.addEventListener("click", function () { window.print(); });
  });
});
document.addEventListener("htmx:beforeSwap", function (event) {
  if (event.detail.xhr.status === 422 && event.target && event.target.id === "media-live") {
    event.detail.shouldSwap = true;
    event.detail.isError = false;
  }
});
