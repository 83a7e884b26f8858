// The widget bundle (esbuild, --loader:.css=text) imports style sheets as their text.
declare module '*.css' {
  const text: string;
  export default text;
}
