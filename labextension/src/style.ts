/** Adds `css` to the document once per `id`: the widget bundle carries its own styles. */
export function injectStyle(id: string, css: string): void {
  if (document.getElementById(id)) {
    return;
  }
  const style = document.createElement('style');
  style.id = id;
  style.textContent = css;
  document.head.appendChild(style);
}
