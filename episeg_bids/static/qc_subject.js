// episeg-bids subject QC page: switch the mask overlay of every figure (contour, fill, none).
'use strict';
(function () {
  const images = Array.from(document.querySelectorAll('img.overlay'));
  const buttons = Array.from(document.querySelectorAll('[data-overlay]'));
  for (const img of images) img.dataset.base = img.getAttribute('src');
  let mode = 'contour';
  let on = true;

  function apply() {
    const shown = on ? mode : 'none';
    for (const img of images) img.src = img.dataset.base + '#' + shown;
    for (const button of buttons) button.setAttribute('aria-pressed', String(button.dataset.overlay === shown));
  }

  for (const button of buttons) {
    button.addEventListener('click', () => {
      on = button.dataset.overlay !== 'none';
      if (on) mode = button.dataset.overlay;
      apply();
    });
  }
  document.addEventListener('keydown', (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.target instanceof HTMLInputElement) return;
    if (event.key === 'c') { mode = mode === 'fill' ? 'contour' : 'fill'; on = true; }
    else if (event.key === 'ArrowRight') on = !on;
    else return;
    event.preventDefault();
    apply();
  });
}());
