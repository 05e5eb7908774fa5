// The widgets HTML manager calls MathJax 2's MathJax.Hub.Queue; run MathJax 3's typesetting instead.
if (window.MathJax && !window.MathJax.Hub) {
  window.MathJax.Hub = {
    Queue: function () {
      if (window.MathJax.typesetPromise) { window.MathJax.typesetPromise(); }
    },
  };
}
