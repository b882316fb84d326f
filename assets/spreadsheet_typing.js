() => {
  // Spreadsheet typing in gradio's editable tables (the Dataset tab's caption grid): with a cell
  // selected by one click, a typed letter replaces the cell's text. Gradio opens the cell's editor
  // on that key but drops the key and keeps the old text with the cursor at its end, so
  // "Typed over" became "<old caption>yped over". The key is remembered here and, when the editor
  // takes the focus (before the next key arrives), becomes its whole text.
  const EDITOR = 'textarea[aria-label="Edit cell"], input[aria-label="Edit cell"]';
  // Keys typed before the editor has the focus (a fast typist, a busy computer) are all kept, in order.
  let pending = null;
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    const onGrid = target instanceof Element && !target.matches(EDITOR) && target.closest("[role=grid], .table-container");
    if (!onGrid || event.key.length !== 1 || event.ctrlKey || event.metaKey || event.altKey) {
      if (!(target instanceof Element && target.matches(EDITOR))) pending = null;
      return;
    }
    const now = performance.now();
    pending = pending && now - pending.at <= 1000 ? { key: pending.key + event.key, at: now } : { key: event.key, at: now };
  }, true);
  document.addEventListener("focusin", (event) => {
    const editor = event.target;
    const typed = pending;
    pending = null;
    if (!typed || !(editor instanceof Element) || !editor.matches(EDITOR)) return;
    if (performance.now() - typed.at > 1000 || editor.readOnly) return;
    editor.value = typed.key;
    editor.setSelectionRange(typed.key.length, typed.key.length);
    editor.dispatchEvent(new Event("input", { bubbles: true }));
  }, true);
}
