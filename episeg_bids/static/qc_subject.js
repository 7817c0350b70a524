// episeg-bids subject QC page: switch the views of every figure (mask contour/fill/none, cord or
// whole field of view, manual mask on/off) through the figures' URL fragment.
'use strict';
(function () {
  const images = Array.from(document.querySelectorAll('img.overlay'));
  const buttons = Array.from(document.querySelectorAll('[data-overlay]'));
  const fullButton = document.getElementById('view-full');
  const referenceButton = document.getElementById('reference-toggle');
  for (const img of images) img.dataset.base = img.getAttribute('src');
  let mode = 'contour';
  let on = true;
  let full = false;
  let reference = true;

  function apply() {
    const shown = on ? mode : 'none';
    const fragment = shown + (full ? '-full' : '') + (reference ? '' : '-noref');
    for (const img of images) img.src = img.dataset.base + '#' + fragment;
    for (const button of buttons) button.setAttribute('aria-pressed', String(button.dataset.overlay === shown));
    fullButton.setAttribute('aria-pressed', String(full));
    if (referenceButton) referenceButton.setAttribute('aria-pressed', String(reference));
  }

  for (const button of buttons) {
    button.addEventListener('click', () => {
      on = button.dataset.overlay !== 'none';
      if (on) mode = button.dataset.overlay;
      apply();
    });
  }
  fullButton.addEventListener('click', () => { full = !full; apply(); });
  if (referenceButton) referenceButton.addEventListener('click', () => { reference = !reference; apply(); });
  document.addEventListener('keydown', (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.target instanceof HTMLInputElement) return;
    if (event.key === 'c') { mode = mode === 'fill' ? 'contour' : 'fill'; on = true; }
    else if (event.key === 'ArrowRight') on = !on;
    else if (event.key === 'w') full = !full;
    else if (event.key === 'g' && referenceButton) reference = !reference;
    else return;
    event.preventDefault();
    apply();
  });
}());
