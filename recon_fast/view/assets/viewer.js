/* recon-fast viewer: draws an ActivityCube (layers x tokens heatmaps, a token's profile across
   depth, a layer across tokens, the token strip, attention statistics, two cubes side by side or
   their difference) or a direct-logit-attribution document, from data embedded in the page.
   Plain canvas and DOM, no library and no network: a heatmap is drawn at screen resolution from
   the visible cells only, so a 364 x 4096 cube costs one pass over its 1.5M values. */
(function () {
  'use strict';
  if (window.ReconFastView) return;  // a notebook may hold several views: define once

  // ---- numbers ---------------------------------------------------------------------------------
  function decodeFloat32(b64) {
    // The payload is little-endian float32 (numpy '<f4'), the byte order of every browser's host.
    var bytes;
    if (typeof Uint8Array.fromBase64 === 'function') {
      bytes = Uint8Array.fromBase64(b64);
    } else {
      var s = atob(b64);
      bytes = new Uint8Array(s.length);
      for (var i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
    }
    return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength >> 2);
  }

  function finite(v) { return v === v && v !== Infinity && v !== -Infinity; }

  // The shortest decimal that reads back as the same float32: numpy's repr of the stored value.
  function fmt32(v) {
    if (v !== v) return 'NaN';
    if (!finite(v)) return v > 0 ? 'inf' : '-inf';
    for (var p = 1; p <= 9; p++) {
      var s = v.toPrecision(p);
      if (Math.fround(+s) === v) return String(+s);
    }
    return String(v);
  }

  function shortNum(v) {
    if (v !== v) return 'NaN';
    if (!finite(v)) return v > 0 ? 'inf' : '-inf';
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return String(+v.toPrecision(4));
  }

  function shownToken(t) {  // a token as text between quotes, line breaks and tabs visible
    return JSON.stringify(String(t));
  }

  function stripText(t) {
    return String(t).replace(/\n/g, '\u21b5').replace(/\t/g, '\u21e5') || '\u2205';
  }

  // ---- colour ----------------------------------------------------------------------------------
  // viridis (sequential, for values that are never negative) and RdBu reversed (diverging, white
  // at zero, for signed values), as evenly spaced stops interpolated into 255 entries; index 255
  // is "no value" (padding, NaN).
  var VIRIDIS = ['440154', '482878', '3e4989', '31688e', '26828e', '1f9e89', '35b779', '6ece58', 'b5de2b', 'fde725'];
  var RDBU = ['053061', '2166ac', '4393c3', '92c5de', 'd1e5f0', 'f7f7f7', 'fddbc7', 'f4a582', 'd6604d', 'b2182b', '67001f'];
  var NAN = 255;

  function buildLut(stops) {
    var rgb = stops.map(function (h) { return [0, 2, 4].map(function (k) { return parseInt(h.substr(k, 2), 16); }); });
    var lut = new Uint8Array(256 * 3);
    for (var i = 0; i < 255; i++) {
      var x = i / 254 * (rgb.length - 1), k = Math.min(Math.floor(x), rgb.length - 2), f = x - k;
      for (var c = 0; c < 3; c++) lut[i * 3 + c] = Math.round(rgb[k][c] * (1 - f) + rgb[k + 1][c] * f);
    }
    return lut;
  }
  var LUTS = { seq: buildLut(VIRIDIS), div: buildLut(RDBU) };

  function cssColour(lut, i) { return 'rgb(' + lut[i * 3] + ',' + lut[i * 3 + 1] + ',' + lut[i * 3 + 2] + ')'; }

  // ---- scales ----------------------------------------------------------------------------------
  // scale = {kind: 'seq' | 'div', log: bool, perRow: bool}. The finite range of each group (each
  // row with per-layer normalisation, else everything) over one or more arrays of the same rows.
  function groupStats(list, rows, perRow) {
    var n = perRow ? rows : 1;
    var lo = new Float64Array(n).fill(Infinity), hi = new Float64Array(n).fill(-Infinity);
    var pos = new Float64Array(n).fill(Infinity), neg = false;
    list.forEach(function (a) {
      for (var r = 0; r < rows; r++) {
        var g = perRow ? r : 0, base = r * a.cols, l = lo[g], h = hi[g], p = pos[g];
        for (var c = 0; c < a.cols; c++) {
          var v = a.values[base + c];
          if (!finite(v)) continue;
          if (v < l) l = v;
          if (v > h) h = v;
          if (v > 0 && v < p) p = v;
        }
        lo[g] = l; hi[g] = h; pos[g] = p;
        if (l < 0) neg = true;
      }
    });
    return { lo: lo, hi: hi, pos: pos, perRow: perRow, signed: neg };
  }

  // How far the largest magnitude is above the typical one: max |v| over the median |v| of the
  // finite non-zero values (the median from at most ~100k of them, evenly strided). A cube whose
  // first token is ~1000x the rest (SmolLM2's residual stream) is one bright column on a linear
  // scale; past LOG_SPREAD the view opens on log, where the other tokens show.
  var LOG_SPREAD = 100;
  function spread(list) {
    var total = 0, max = 0, sample = [];
    list.forEach(function (a) { total += a.values.length; });
    var stride = Math.max(1, Math.ceil(total / 100000));
    list.forEach(function (a) {
      for (var i = 0; i < a.values.length; i++) {
        var v = Math.abs(a.values[i]);
        if (!(v > 0) || v === Infinity) continue;
        if (v > max) max = v;
        if (i % stride === 0) sample.push(v);
      }
    });
    if (!sample.length) return 1;
    sample.sort(function (x, y) { return x - y; });
    return max / sample[sample.length >> 1];
  }

  function params(scale, st, g) {
    var lo = st.lo[g], hi = st.hi[g];
    if (!(hi >= lo)) return null;  // no finite value in the group
    if (scale.kind === 'div') {
      var L = Math.max(Math.abs(lo), Math.abs(hi)) || 1;
      if (scale.log) { var c = L * 1e-3; return { div: true, log: true, c: c, k: 1 / Math.log1p(L / c) }; }
      return { div: true, log: false, k: 1 / L };
    }
    if (scale.log && st.pos[g] < Infinity) {
      var a = Math.log(st.pos[g]);
      return { div: false, log: true, a: a, span: (Math.log(hi) - a) || 1 };
    }
    return { div: false, log: false, lo: lo, span: (hi - lo) || 1 };
  }

  function toT(v, p) {
    var t;
    if (p.div) {
      t = p.log ? 0.5 + 0.5 * (v < 0 ? -1 : 1) * Math.log1p(Math.abs(v) / p.c) * p.k : 0.5 + 0.5 * v * p.k;
    } else if (p.log) {
      t = v > 0 ? (Math.log(v) - p.a) / p.span : 0;
    } else {
      t = (v - p.lo) / p.span;
    }
    return t < 0 ? 0 : t > 1 ? 1 : t;
  }

  function fromT(t, p) {
    if (p.div) {
      var s = (t - 0.5) * 2;
      if (!p.log) return s / p.k;
      return (s < 0 ? -1 : 1) * p.c * Math.expm1(Math.abs(s) / p.k);
    }
    return p.log ? Math.exp(p.a + t * p.span) : p.lo + t * p.span;
  }

  function colourIndex(values, rows, cols, scale, st) {
    var out = new Uint8Array(rows * cols);
    for (var r = 0; r < rows; r++) {
      var p = params(scale, st, st.perRow ? r : 0), base = r * cols;
      for (var c = 0; c < cols; c++) {
        var v = values[base + c];
        out[base + c] = p === null || v !== v ? NAN : (toT(v, p) * 254 + 0.5) | 0;
      }
    }
    return out;
  }

  // ---- DOM -------------------------------------------------------------------------------------
  function el(tag, cls, parent, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }

  function select(parent, label, name, options, value, onChange) {
    var wrap = el('label', 'rfv-control', parent, label + ' ');
    var s = el('select', '', wrap);
    s.name = name;
    options.forEach(function (o) {
      var opt = el('option', '', s, Array.isArray(o) ? o[1] : o);
      opt.value = Array.isArray(o) ? o[0] : o;
    });
    s.value = value;
    s.addEventListener('change', function () { onChange(s.value); });
    return s;
  }

  function fitText(ctx, text, width) {
    if (ctx.measureText(text).width <= width) return text;
    var lo = 0, hi = text.length;
    while (lo < hi) {
      var mid = (lo + hi + 1) >> 1;
      if (ctx.measureText(text.slice(0, mid) + '\u2026').width <= width) lo = mid; else hi = mid - 1;
    }
    return lo ? text.slice(0, lo) + '\u2026' : '';
  }

  function niceStep(minStep) {  // 1, 2, 5, 10, 20, 50, ...: the first at least minStep
    var s = 1;
    while (s < minStep) s *= String(s).charAt(0) === '2' ? 2.5 : 2;
    return Math.round(s);
  }

  function showTip(tip, wrap, lines, x, y) {
    tip.textContent = '';
    lines.forEach(function (line) { el('div', '', tip, line); });
    tip.style.display = 'block';
    var w = wrap.clientWidth, tw = tip.offsetWidth;
    tip.style.left = Math.max(0, Math.min(x + 14, w - tw - 4)) + 'px';
    tip.style.top = (y + 16) + 'px';
  }

  // ---- heatmap ---------------------------------------------------------------------------------
  // A rows x cols grid of float32 values drawn on a canvas. Several cells per screen pixel show
  // the most extreme of them (a lone outlier token stays visible); one cell over several pixels
  // is a block. Drag a box to zoom, double-click to reset, click a cell to select it.
  function Heatmap(host, o) {
    this.o = Object.assign({ height: 320, left: 160, right: 12, top: 8, bottom: 30, maxCellW: Infinity,
      maxCellH: Infinity, nanRgb: [175, 175, 175], zoom: true, colLabel: String, rowLabel: String,
      tooltip: null, onClick: null }, o);
    this.wrap = el('div', 'rfv-heat', host);
    this.canvas = el('canvas', 'rfv-canvas', this.wrap);
    this.box = el('div', 'rfv-box', this.wrap);
    this.tip = el('div', 'rfv-tip', this.wrap);
    this.legend = el('canvas', 'rfv-legend', host);
    this.sel = { r: -1, c: -1 };
    this.rows = 0; this.cols = 0;
    var self = this, drag = null;
    this.canvas.addEventListener('mousemove', function (e) {
      var hit = self.cellAt(e.offsetX, e.offsetY);
      if (drag) {
        var x0 = Math.min(drag.x, e.offsetX), y0 = Math.min(drag.y, e.offsetY);
        var moved = Math.abs(e.offsetX - drag.x) + Math.abs(e.offsetY - drag.y) > 4;
        self.box.style.display = moved && self.o.zoom ? 'block' : 'none';
        Object.assign(self.box.style, { left: x0 + 'px', top: y0 + 'px', width: Math.abs(e.offsetX - drag.x) + 'px',
          height: Math.abs(e.offsetY - drag.y) + 'px' });
      }
      if (hit && self.o.tooltip) {
        var lines = self.o.tooltip(hit.r, hit.c);
        if (lines) { showTip(self.tip, self.wrap, lines, e.offsetX, e.offsetY); return; }
      }
      self.tip.style.display = 'none';
    });
    this.canvas.addEventListener('mouseleave', function () { self.tip.style.display = 'none'; });
    this.canvas.addEventListener('mousedown', function (e) { drag = { x: e.offsetX, y: e.offsetY }; e.preventDefault(); });
    window.addEventListener('mouseup', function (e) {
      if (!drag) return;
      var start = drag;
      drag = null;
      self.box.style.display = 'none';
      var rect = self.canvas.getBoundingClientRect(), x = e.clientX - rect.left, y = e.clientY - rect.top;
      var a = self.cellAt(start.x, start.y, true), b = self.cellAt(x, y, true);
      if (Math.abs(x - start.x) + Math.abs(y - start.y) <= 4) {
        if (a && self.o.onClick && self.cellAt(start.x, start.y)) self.o.onClick(a.r, a.c);
      } else if (a && b && self.o.zoom) {
        self.view = { r0: Math.min(a.r, b.r), r1: Math.max(a.r, b.r) + 1, c0: Math.min(a.c, b.c), c1: Math.max(a.c, b.c) + 1 };
        self.draw();
        if (self.o.onView) self.o.onView(self.view);
      }
    });
    this.canvas.addEventListener('dblclick', function () { self.resetView(); });
  }

  Heatmap.prototype.resetView = function () {
    this.view = { r0: 0, r1: this.rows, c0: 0, c1: this.cols };
    this.draw();
    if (this.o.onView) this.o.onView(this.view);
  };

  // values: Float32Array [rows * cols]; stats: from groupStats (shared between heatmaps that
  // must use the same colours), else computed here.
  Heatmap.prototype.set = function (values, rows, cols, scale, stats) {
    var same = rows === this.rows && cols === this.cols;
    this.values = values; this.rows = rows; this.cols = cols; this.scale = scale;
    this.stats = stats || groupStats([{ values: values, cols: cols }], rows, scale.perRow);
    this.lut = LUTS[scale.kind];
    this.idx = colourIndex(values, rows, cols, scale, this.stats);
    if (!same || !this.view) this.view = { r0: 0, r1: rows, c0: 0, c1: cols };
    this.draw();
  };

  Heatmap.prototype.plot = function () {
    var o = this.o, width = Math.max(this.wrap.clientWidth, 200);
    var nr = this.view.r1 - this.view.r0, nc = this.view.c1 - this.view.c0;
    var w = Math.min(width - o.left - o.right, nc * o.maxCellW);
    var h = Math.min(o.height - o.top - o.bottom, nr * o.maxCellH);
    return { x: o.left, y: o.top, w: Math.max(w, 10), h: Math.max(h, 10), width: width, height: Math.min(o.height, h + o.top + o.bottom) };
  };

  // (row, col) under a point of the canvas (CSS pixels), or null outside the cells.
  Heatmap.prototype.cellAt = function (x, y, clamp) {
    if (!this.view) return null;
    var p = this.plot(), v = this.view;
    var fx = (x - p.x) / p.w, fy = (y - p.y) / p.h;
    if (!clamp && (fx < 0 || fx >= 1 || fy < 0 || fy >= 1)) return null;
    fx = Math.min(Math.max(fx, 0), 0.9999); fy = Math.min(Math.max(fy, 0), 0.9999);
    return { r: v.r0 + Math.floor(fy * (v.r1 - v.r0)), c: v.c0 + Math.floor(fx * (v.c1 - v.c0)) };
  };

  // The viewport point at the centre of a cell (tests and automation hover there).
  Heatmap.prototype.cellCenter = function (r, c) {
    var p = this.plot(), v = this.view, rect = this.canvas.getBoundingClientRect();
    return { x: rect.left + p.x + (c - v.c0 + 0.5) * p.w / (v.c1 - v.c0),
      y: rect.top + p.y + (r - v.r0 + 0.5) * p.h / (v.r1 - v.r0) };
  };

  Heatmap.prototype.draw = function () {
    if (!this.idx) return;
    var p = this.plot(), o = this.o, v = this.view, dpr = window.devicePixelRatio || 1;
    var cv = this.canvas;
    cv.style.width = p.width + 'px'; cv.style.height = p.height + 'px';
    cv.width = Math.round(p.width * dpr); cv.height = Math.round(p.height * dpr);
    var ctx = cv.getContext('2d');
    var pw = Math.max(1, Math.round(p.w * dpr)), ph = Math.max(1, Math.round(p.h * dpr));
    var img = ctx.createImageData(pw, ph), px = img.data, lut = this.lut, idx = this.idx, cols = this.cols;
    var nc = v.c1 - v.c0, nr = v.r1 - v.r0, div = this.scale.kind === 'div', nan = o.nanRgb;
    var ca = new Int32Array(pw), cb = new Int32Array(pw);
    for (var x = 0; x < pw; x++) {
      ca[x] = v.c0 + Math.floor(x * nc / pw);
      cb[x] = Math.max(v.c0 + Math.floor((x + 1) * nc / pw), ca[x] + 1);
    }
    var prevA = -1, prevB = -1;
    for (var y = 0; y < ph; y++) {
      var ra = v.r0 + Math.floor(y * nr / ph), rb = Math.max(v.r0 + Math.floor((y + 1) * nr / ph), ra + 1);
      var row = y * pw * 4;
      if (ra === prevA && rb === prevB) { px.copyWithin(row, row - pw * 4, row); continue; }
      prevA = ra; prevB = rb;
      for (x = 0; x < pw; x++) {
        var best = NAN, far = -1;
        for (var r = ra; r < rb; r++) {
          var base = r * cols;
          for (var c = ca[x]; c < cb[x]; c++) {
            var i = idx[base + c];
            if (i === NAN) continue;
            var d = div ? (i > 127 ? i - 127 : 127 - i) : i;  // the most extreme cell of the pixel
            if (d > far) { far = d; best = i; }
          }
        }
        var q = row + x * 4;
        if (best === NAN) { px[q] = nan[0]; px[q + 1] = nan[1]; px[q + 2] = nan[2]; }
        else { px[q] = lut[best * 3]; px[q + 1] = lut[best * 3 + 1]; px[q + 2] = lut[best * 3 + 2]; }
        px[q + 3] = 255;
      }
    }
    ctx.putImageData(img, Math.round(p.x * dpr), Math.round(p.y * dpr));
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    var cw = p.w / nc, rh = p.h / nr;
    // the selected row and column
    ctx.strokeStyle = 'rgba(0,0,0,0.85)';
    ctx.lineWidth = 1;
    if (this.sel.c >= v.c0 && this.sel.c < v.c1) ctx.strokeRect(p.x + (this.sel.c - v.c0) * cw + 0.5, p.y + 0.5, Math.max(cw - 1, 1), p.h - 1);
    if (this.sel.r >= v.r0 && this.sel.r < v.r1) ctx.strokeRect(p.x + 0.5, p.y + (this.sel.r - v.r0) * rh + 0.5, p.w - 1, Math.max(rh - 1, 1));
    // labels: every row that has room, token text where columns are wide, else positions
    ctx.fillStyle = '#333';
    ctx.font = '11px system-ui, sans-serif';
    ctx.textBaseline = 'middle';
    ctx.textAlign = 'right';
    var rstep = Math.max(1, Math.ceil(13 / rh));
    for (var rr = v.r0; rr < v.r1; rr++) {
      if ((rr - v.r0) % rstep) continue;
      ctx.fillText(fitText(ctx, o.rowLabel(rr), o.left - 8), p.x - 5, p.y + (rr - v.r0 + 0.5) * rh);
    }
    ctx.textBaseline = 'top';
    ctx.textAlign = 'center';
    if (cw >= 26) {
      for (var cc = v.c0; cc < v.c1; cc++) ctx.fillText(fitText(ctx, o.colLabel(cc), cw - 2), p.x + (cc - v.c0 + 0.5) * cw, p.y + p.h + 4);
    } else {
      var step = niceStep(60 / cw);
      for (cc = Math.ceil(v.c0 / step) * step; cc < v.c1; cc += step) {
        var xx = p.x + (cc - v.c0 + 0.5) * cw;
        ctx.fillRect(xx, p.y + p.h, 1, 3);
        ctx.fillText(String(cc), xx, p.y + p.h + 5);
      }
    }
    this.drawLegend(p);
  };

  Heatmap.prototype.drawLegend = function (p) {
    var cv = this.legend, dpr = window.devicePixelRatio || 1, w = Math.min(p.w, 420), h = 34;
    cv.style.width = w + 'px'; cv.style.height = h + 'px'; cv.style.marginLeft = p.x + 'px';
    cv.width = Math.round(w * dpr); cv.height = Math.round(h * dpr);
    var ctx = cv.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    for (var i = 0; i < 255; i++) {
      ctx.fillStyle = cssColour(this.lut, i);
      ctx.fillRect(i / 255 * w, 2, w / 255 + 1, 12);
    }
    ctx.fillStyle = '#333';
    ctx.font = '11px system-ui, sans-serif';
    ctx.textBaseline = 'top';
    var pr = this.stats.perRow ? null : params(this.scale, this.stats, 0);
    var ticks = this.scale.kind === 'div' ? [0, 0.25, 0.5, 0.75, 1] : [0, 0.5, 1];
    ticks.forEach(function (t, k) {
      ctx.textAlign = k === 0 ? 'left' : k === ticks.length - 1 ? 'right' : 'center';
      var text;
      if (pr) text = shortNum(fromT(t, pr));
      else text = t === 0 ? (this.scale.kind === 'div' ? '\u2212max|row|' : 'row min') : t === 1 ? (this.scale.kind === 'div' ? '+max|row|' : 'row max') : t === 0.5 && this.scale.kind === 'div' ? '0' : '';
      ctx.fillText(text, t * w, 17);
    }, this);
  };

  // ---- line chart ------------------------------------------------------------------------------
  function LineChart(host, o) {
    this.o = Object.assign({ height: 170, left: 62, right: 12, top: 8, bottom: 26, onClick: null }, o);
    this.wrap = el('div', 'rfv-line', host);
    this.title = el('div', 'rfv-subtitle', this.wrap);
    this.canvas = el('canvas', 'rfv-canvas', this.wrap);
    this.tip = el('div', 'rfv-tip', this.wrap);
    var self = this;
    this.canvas.addEventListener('mousemove', function (e) {
      var i = self.indexAt(e.offsetX);
      if (i === null) { self.tip.style.display = 'none'; return; }
      var lines = [self.label(i)];
      self.series.forEach(function (s) { lines.push((s.name ? s.name + ': ' : '') + fmt32(s.values[i])); });
      showTip(self.tip, self.wrap, lines, e.offsetX, e.offsetY + self.canvas.offsetTop);
    });
    this.canvas.addEventListener('mouseleave', function () { self.tip.style.display = 'none'; });
    this.canvas.addEventListener('click', function (e) {
      var i = self.indexAt(e.offsetX);
      if (i !== null && self.o.onClick) self.o.onClick(i);
    });
  }

  LineChart.prototype.set = function (title, series, n, label, mark) {
    this.title.textContent = title;
    this.series = series; this.n = n; this.label = label; this.mark = mark;
    this.draw();
  };

  LineChart.prototype.indexAt = function (x) {
    if (!this.n) return null;
    var w = this.wrap.clientWidth - this.o.left - this.o.right, f = (x - this.o.left) / w;
    if (f < -0.02 || f > 1.02) return null;
    return Math.min(this.n - 1, Math.max(0, Math.round(f * (this.n - 1))));
  };

  LineChart.prototype.draw = function () {
    var o = this.o, width = Math.max(this.wrap.clientWidth, 200), dpr = window.devicePixelRatio || 1;
    var cv = this.canvas;
    cv.style.width = width + 'px'; cv.style.height = o.height + 'px';
    cv.width = Math.round(width * dpr); cv.height = Math.round(o.height * dpr);
    var ctx = cv.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    var w = width - o.left - o.right, h = o.height - o.top - o.bottom, n = this.n;
    var lo = Infinity, hi = -Infinity;
    this.series.forEach(function (s) {
      for (var i = 0; i < n; i++) { var v = s.values[i]; if (finite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; } }
    });
    if (!(hi >= lo)) { lo = 0; hi = 1; }
    if (hi === lo) { hi += 0.5; lo -= 0.5; }
    var pad = (hi - lo) * 0.06;
    lo -= pad; hi += pad;
    var X = function (i) { return o.left + (n > 1 ? i / (n - 1) : 0.5) * w; };
    var Y = function (v) { return o.top + (1 - (v - lo) / (hi - lo)) * h; };
    ctx.strokeStyle = '#bbb'; ctx.lineWidth = 1;
    ctx.strokeRect(o.left + 0.5, o.top + 0.5, w, h);
    ctx.fillStyle = '#333'; ctx.font = '11px system-ui, sans-serif';
    ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
    [lo + pad, (lo + hi) / 2, hi - pad].forEach(function (v) { ctx.fillText(shortNum(v), o.left - 5, Y(v)); });
    if (lo < 0 && hi > 0) { ctx.strokeStyle = '#ddd'; ctx.beginPath(); ctx.moveTo(o.left, Y(0)); ctx.lineTo(o.left + w, Y(0)); ctx.stroke(); }
    ctx.textAlign = 'center'; ctx.textBaseline = 'top';
    var step = niceStep(70 * n / w);
    for (var t = 0; t < n; t += step) ctx.fillText(String(t), X(t), o.top + h + 5);
    if (this.mark >= 0 && this.mark < n) {
      ctx.strokeStyle = 'rgba(0,0,0,0.35)'; ctx.beginPath(); ctx.moveTo(X(this.mark), o.top); ctx.lineTo(X(this.mark), o.top + h); ctx.stroke();
    }
    this.series.forEach(function (s) {
      ctx.strokeStyle = s.colour; ctx.lineWidth = 1.5; ctx.beginPath();
      var open = false;
      for (var i = 0; i < n; i++) {
        var v = s.values[i];
        if (!finite(v)) { open = false; continue; }
        if (open) ctx.lineTo(X(i), Y(v)); else ctx.moveTo(X(i), Y(v));
        open = true;
      }
      ctx.stroke();
      if (n <= 64) {
        ctx.fillStyle = s.colour;
        for (i = 0; i < n; i++) if (finite(s.values[i])) { ctx.beginPath(); ctx.arc(X(i), Y(s.values[i]), 2.2, 0, 7); ctx.fill(); }
      }
    });
  };

  // ---- the cube view ---------------------------------------------------------------------------
  var SERIES = ['#1f5fa8', '#d35400', '#2e8b57'];

  function mountCube(root, meta, data) {
    var cubes = meta.cubes.map(function (c) { return Object.assign({ data: data.subarray(c.offset, c.offset + c.size) }, c); });
    var A = cubes[0], B = cubes[1] || null;
    var metrics = A.metrics.filter(function (m) { return !B || B.metrics.indexOf(m) >= 0; });
    // scaleChosen: false until the user picks a scale; until then each metric opens on its own
    // best (log past LOG_SPREAD, else linear).
    var S = { metric: metrics[0], scale: 'linear', scaleChosen: false, norm: 'global', batch: 0, mode: B ? 'side' : 'A',
      token: -1, layer: A.layers.length - 1, stat: null, head: null };
    var app = { state: S, heatmaps: {}, charts: {} };
    root.rfv = app;

    var head = el('div', 'rfv-head', root);
    el('div', 'rfv-title', head, meta.title);
    el('div', 'rfv-meta', head, cubes.map(function (c, k) {
      return (B ? 'ABC'[k] + ': ' : '') + c.name + ' \u2014 ' + c.layers.length + ' layers \u00d7 ' + c.T +
        ' tokens \u00d7 ' + c.metrics.length + ' metrics' + (c.batch > 1 ? ' \u00d7 ' + c.batch + ' sequences' : '') +
        (c.model ? ' \u00b7 ' + c.model : '');
    }).join('   |   '));
    var bar = el('div', 'rfv-controls', root);
    if (B) select(bar, 'show', 'mode', [['side', 'A and B'], ['diff', 'A \u2212 B'], ['A', 'A'], ['B', 'B']], S.mode, function (v) { S.mode = v; render(); });
    select(bar, 'metric', 'metric', metrics, S.metric, function (v) { S.metric = v; render(); });
    var scaleSelect = select(bar, 'scale', 'scale', [['linear', 'linear'], ['log', 'log']], S.scale,
      function (v) { S.scale = v; S.scaleChosen = true; render(); });
    select(bar, 'normalise', 'norm', [['global', 'global'], ['layer', 'per layer']], S.norm, function (v) { S.norm = v; render(); });
    var batches = Math.min(A.batch, B ? B.batch : A.batch);
    if (batches > 1) {
      select(bar, 'sequence', 'batch', Array.from({ length: batches }, function (_, i) { return [String(i), String(i)]; }), '0',
        function (v) { S.batch = +v; render(); });
    }
    el('span', 'rfv-hint', bar, 'hover: values \u00b7 click: select token and layer \u00b7 drag: zoom \u00b7 double-click: reset');

    function slice(cube, metric) {  // Float32Array [layers * tokens] of one metric and sequence
      var m = cube.metrics.indexOf(metric), L = cube.layers.length, T = cube.T;
      var off = (m * cube.batch + S.batch) * L * T;
      return cube.data.subarray(off, off + L * T);
    }
    function tokenText(cube, layer, t) {
      var axis = cube.token_axis && cube.token_axis[layer] ? cube.decoder_tokens : cube.tokens;
      var row = axis[Math.min(S.batch, axis.length - 1)] || [];
      return t < row.length ? row[t] : '';
    }
    function padded(values, T, width) {
      if (T === width) return values;
      var out = new Float32Array(L * width).fill(NaN);
      for (var l = 0; l < L; l++) out.set(values.subarray(l * T, (l + 1) * T), l * width);
      return out;
    }
    function difference() {
      var a = slice(A, S.metric), b = slice(B, S.metric), L = A.layers.length, T = Math.min(A.T, B.T);
      var out = new Float32Array(L * T);
      for (var l = 0; l < L; l++) for (var t = 0; t < T; t++) out[l * T + t] = a[l * A.T + t] - b[l * B.T + t];
      return { data: out, T: T };
    }

    var sec = el('div', 'rfv-section', root);
    var heading = el('div', 'rfv-subtitle', sec);
    var L = A.layers.length, height = Math.min(Math.max(L * 14 + 40, 220), B ? 420 : 560);
    function makeHeat(which) {
      var label = el('div', 'rfv-which', sec);
      return { label: label, map: new Heatmap(sec, {
        height: height,
        rowLabel: function (r) { return A.layers[r]; },
        colLabel: function (c) { return stripText(cellToken(which, r0(), c)); },
        tooltip: function (r, c) { return tooltip(which, r, c); },
        onClick: function (r, c) { S.layer = r; S.token = c; render(true); },
        onView: function (v) { syncViews(which, v); strip(); }
      }) };
    }
    function r0() { return S.layer; }  // token labels follow the selected layer's token axis
    function syncViews(which, v) {  // side by side: zooming one zooms the other
      Object.keys(app.heatmaps).forEach(function (k) {
        var h = app.heatmaps[k].map;
        if (k !== which && h.cols === app.heatmaps[which].map.cols) { h.view = Object.assign({}, v); h.draw(); }
      });
    }
    app.heatmaps.A = makeHeat('A');
    if (B) app.heatmaps.B = makeHeat('B');
    function cellToken(which, r, c) {
      if (which === 'B' || (which === 'A' && S.mode === 'B')) return tokenText(B, r, c);
      if (S.mode === 'diff') { var a = tokenText(A, r, c), b = tokenText(B, r, c); return a === b ? a : a + '/' + b; }
      return tokenText(A, r, c);
    }
    function cubeOf(which) { return which === 'B' || S.mode === 'B' ? B : A; }
    function valueAt(which, r, c) {
      var h = app.heatmaps[which].map;
      return h.values[r * h.cols + c];
    }
    function tooltip(which, r, c) {
      var lines = ['layer ' + r + ': ' + A.layers[r]];
      if (S.mode === 'diff') {
        lines.push('token ' + c + ': A ' + shownToken(tokenText(A, r, c)) + ', B ' + shownToken(tokenText(B, r, c)));
        var a = slice(A, S.metric)[r * A.T + c], b = slice(B, S.metric)[r * B.T + c];
        lines.push(S.metric + ' A \u2212 B = ' + fmt32(valueAt(which, r, c)) + '  (A ' + fmt32(a) + ', B ' + fmt32(b) + ')');
        return lines;
      }
      lines.push('token ' + c + ': ' + shownToken(tokenText(cubeOf(which), r, c)));
      lines.push(S.metric + ' = ' + fmt32(valueAt(which, r, c)));
      return lines;
    }

    var lines = el('div', 'rfv-pair', root);
    app.charts.token = new LineChart(el('div', 'rfv-half', lines), { onClick: function (i) { S.layer = i; render(true); } });
    app.charts.layer = new LineChart(el('div', 'rfv-half', lines), { onClick: function (i) { S.token = i; render(true); } });
    var stripSec = el('div', 'rfv-section', root);
    var stripTitle = el('div', 'rfv-subtitle', stripSec);
    var stripBox = el('div', 'rfv-strip', stripSec);

    function shown() {  // what the heatmaps show: [{which, values, cols, cube}]
      if (S.mode === 'diff') { var d = difference(); return [{ which: 'A', values: d.data, cols: d.T, name: 'A \u2212 B' }]; }
      if (S.mode === 'side') {  // both on the longer token axis, so token i sits above token i
        var T = Math.max(A.T, B.T);
        return [{ which: 'A', values: padded(slice(A, S.metric), A.T, T), cols: T, name: 'A' },
          { which: 'B', values: padded(slice(B, S.metric), B.T, T), cols: T, name: 'B' }];
      }
      var c = S.mode === 'B' ? B : A;
      return [{ which: 'A', values: slice(c, S.metric), cols: c.T, name: B ? S.mode : '' }];
    }

    var spreads = {};  // spread() of what is shown, per metric, mode and sequence: clicks redraw often
    function render(selectionOnly) {
      var items = shown();
      var stats = groupStats(items, L, S.norm === 'layer'), why = '';
      if (!S.scaleChosen) {
        var key = S.metric + '|' + S.mode + '|' + S.batch;
        var ratio = key in spreads ? spreads[key] : (spreads[key] = spread(items));
        S.scale = scaleSelect.value = ratio > LOG_SPREAD ? 'log' : 'linear';
        why = ' (the largest |value| is ' + (ratio < 1e4 ? ratio.toPrecision(3) : ratio.toExponential(1)) + '\u00d7 the median' +
          (S.scale === 'log' ? '' : ': linear up to ' + LOG_SPREAD + '\u00d7') + ')';
      }
      var scale = { kind: stats.signed ? 'div' : 'seq', log: S.scale === 'log', perRow: S.norm === 'layer' };
      app.scale = scale;
      heading.textContent = 'layers \u00d7 tokens \u2014 ' + S.metric + (S.mode === 'diff' ? ' (A \u2212 B, tokens aligned by index)' : '') +
        ' \u00b7 ' + (scale.kind === 'div' ? 'diverging (signed values)' : 'sequential (non-negative values)') +
        (scale.log ? (scale.kind === 'div' ? ', symmetric log' : ', log') : ', linear') + why + (scale.perRow ? ', each layer on its own range' : '');
      var T = Math.max.apply(null, items.map(function (i) { return i.cols; }));
      if (S.token >= T) S.token = T - 1;
      Object.keys(app.heatmaps).forEach(function (k) {
        var h = app.heatmaps[k], item = items.filter(function (i) { return i.which === k; })[0];
        h.map.wrap.style.display = h.map.legend.style.display = h.label.style.display = item ? '' : 'none';
        if (!item) return;
        var named = item.name.length === 1 ? cubes['AB'.indexOf(item.name)].name : '';
        h.label.textContent = item.name + (named && named !== item.name ? ': ' + named : '');
        h.map.sel = { r: S.layer, c: S.token };
        if (selectionOnly) h.map.draw(); else h.map.set(item.values, L, item.cols, scale, stats);
      });
      var token = S.token >= 0 ? S.token : T - 1;
      var depth = items.map(function (it, k) {
        var v = new Float32Array(L);
        for (var l = 0; l < L; l++) v[l] = token < it.cols ? it.values[l * it.cols + token] : NaN;
        return { values: v, colour: SERIES[k], name: it.name };
      });
      app.charts.token.set('token ' + token + ' ' + shownToken(cellToken('A', L - 1, token)) + ' across depth \u2014 ' + S.metric + ' (click a point: select that layer)',
        depth, L, function (l) { return 'layer ' + l + ': ' + A.layers[l]; }, S.layer);
      var across = items.map(function (it, k) { return { values: it.values.subarray(S.layer * it.cols, (S.layer + 1) * it.cols), colour: SERIES[k], name: it.name }; });
      app.charts.layer.set('layer ' + S.layer + ' ' + A.layers[S.layer] + ' across tokens \u2014 ' + S.metric + ' (click: select that token)',
        across, T, function (t) { return 'token ' + t + ': ' + shownToken(cellToken('A', S.layer, t)); }, S.token);
      strip();
    }

    // (c) the tokens coloured by the selected layer and metric, as the heatmap colours them
    function strip() {
      var h = app.heatmaps.A.map, v = h.view, r = S.layer;
      var c0 = v.c0, c1 = Math.min(v.c1, v.c0 + 2000);
      stripTitle.textContent = 'tokens coloured by layer ' + r + ' ' + A.layers[r] + ' \u2014 ' + S.metric +
        (S.mode === 'diff' ? ' (A \u2212 B)' : S.mode === 'side' ? ' (A)' : '') +
        (c1 < v.c1 ? ' \u2014 tokens ' + c0 + '\u2013' + (c1 - 1) + ' of the zoomed range; zoom in to see others' : '') + ' (click a token to select it)';
      stripBox.textContent = '';
      for (var c = c0; c < c1; c++) {
        var i = h.idx[r * h.cols + c];
        var s = el('span', 'rfv-tok' + (c === S.token ? ' rfv-sel' : ''), stripBox, stripText(cellToken('A', r, c)));
        if (i !== 255) {
          s.style.background = cssColour(h.lut, i);
          var lum = 0.299 * h.lut[i * 3] + 0.587 * h.lut[i * 3 + 1] + 0.114 * h.lut[i * 3 + 2];
          s.style.color = lum < 128 ? '#fff' : '#000';
        }
        s.title = 'token ' + c + ': ' + shownToken(cellToken('A', r, c)) + '\n' + S.metric + ' = ' + fmt32(h.values[r * h.cols + c]);
        s.dataset.token = c;
      }
    }
    stripBox.addEventListener('click', function (e) {
      var t = e.target.dataset && e.target.dataset.token;
      if (t !== undefined) { S.token = +t; render(true); }
    });

    if (meta.attention) mountAttention(root, meta.attention, data, A, app, S);
    render();
    var resize = function () {
      Object.keys(app.heatmaps).forEach(function (k) { app.heatmaps[k].map.draw(); });
      app.charts.token.draw(); app.charts.layer.draw();
      if (app.attention) app.attention.redraw();
    };
    if (window.ResizeObserver) {
      var width = root.clientWidth;
      new ResizeObserver(function () { if (root.clientWidth !== width) { width = root.clientWidth; resize(); } }).observe(root);
    }
    return app;
  }

  // (d) attention statistics: layers x heads per statistic (mean over query tokens), and one
  // head's statistic across the query tokens. att: {layers, heads, queries, batch, stats, offset, size}
  function mountAttention(root, att, data, A, app, S) {
    var arr = data.subarray(att.offset, att.offset + att.size);
    var L = att.layers.length, H = att.heads, Q = att.queries;
    var sec = el('div', 'rfv-section', root);
    el('div', 'rfv-subtitle', sec, 'attention statistics \u2014 ' + L + ' attention layers \u00d7 ' + H + ' heads, mean over query tokens (click a cell: that head across tokens)');
    var st = { stat: att.stats[0], layer: 0, head: 0 };
    var bar = el('div', 'rfv-controls', sec);
    select(bar, 'statistic', 'attention_stat', att.stats, st.stat, function (v) { st.stat = v; render(); });
    var map = new Heatmap(sec, {
      height: Math.min(Math.max(L * 16 + 40, 160), 520), maxCellW: 40, maxCellH: 22, zoom: false, left: 110,
      rowLabel: function (r) { return att.layers[r]; }, colLabel: function (c) { return 'H' + c; },
      tooltip: function (r, c) { return [att.layers[r] + ' head ' + c, st.stat + ' (mean over tokens) = ' + fmt32(map.values[r * H + c])]; },
      onClick: function (r, c) { st.layer = r; st.head = c; render(); }
    });
    var chart = new LineChart(sec, {});
    function series(r, h) {
      var s = att.stats.indexOf(st.stat), off = (((s * att.batch + Math.min(S.batch, att.batch - 1)) * L + r) * H + h) * Q;
      return arr.subarray(off, off + Q);
    }
    function render() {
      var grid = new Float32Array(L * H);
      for (var r = 0; r < L; r++) for (var h = 0; h < H; h++) {
        var q = series(r, h), sum = 0, n = 0;
        for (var i = 0; i < Q; i++) if (finite(q[i])) { sum += q[i]; n++; }
        grid[r * H + h] = n ? sum / n : NaN;
      }
      var stats = groupStats([{ values: grid, cols: H }], L, false);
      map.sel = { r: st.layer, c: st.head };
      map.set(grid, L, H, { kind: stats.signed ? 'div' : 'seq', log: false, perRow: false }, stats);
      chart.set(att.layers[st.layer] + ' head ' + st.head + ' \u2014 ' + st.stat + ' per query token', [{ values: series(st.layer, st.head), colour: SERIES[0], name: '' }],
        Q, function (t) { return 'token ' + t + ': ' + shownToken((A.tokens[Math.min(S.batch, A.tokens.length - 1)] || [])[t] || ''); }, -1);
    }
    render();
    app.attention = { map: map, chart: chart, redraw: function () { map.draw(); chart.draw(); } };
  }

  // ---- the attribution view --------------------------------------------------------------------
  // Term labels are read with the grammar the page carries (meta.term_kinds, written from
  // recon_fast.attribution_labels, which also writes and reads them in Python): per kind a regular
  // expression, the fields its groups hold, the grid cell the term adds to (a head's sources and
  // its S_rest to the head, a neuron to "mlp", as Attribution.grid/head_totals add them) and
  // HexRay's word and place. A term: {kind, layer, head, source, neuron (-1 where the kind has
  // none), rest, cell}; rest marks "L{i}.H{h}.S_rest", with source_top_k the sum of the sources a
  // head did not keep (a sum, not a term of its own).
  function labelGrammar(kinds) {
    var parsers = kinds.map(function (k) { return { kind: k, re: new RegExp('^(?:' + k.pattern + ')$') }; });
    var head = kinds.filter(function (k) { return k.name === 'head'; })[0];
    function fill(template, t) { return template.replace(/\{(\w+)\}/g, function (_, f) { return t[f]; }); }
    function parse(label) {
      for (var i = 0; i < parsers.length; i++) {
        var m = parsers[i].re.exec(label), k = parsers[i].kind;
        if (!m) continue;
        var t = { kind: k.name, layer: -1, head: -1, source: -1, neuron: -1, rest: k.name === 'source_rest' };
        k.fields.forEach(function (f, g) { t[f] = +m[g + 1]; });
        t.cell = k.cell === null ? null : fill(k.cell, t);
        t.word = k.word;
        t.where = k.where === null ? null : fill(k.where, t);
        return t;
      }
      return null;
    }
    return {
      // a per-layer term (null for embed, norm_bias, ..., and for a label of no kind)
      layerTerm: function (label) { var t = parse(label); return t && t.layer >= 0 ? t : null; },
      // HexRay's names ("MLP L9", "Attn L11", "Head L3.H7") as `attribute` prints them, and, spelled
      // out for a page where a line has room (the command prints "Head L3.H7<-5"), a head's share
      // from a source 'Head L3.H7 <- token "Paris" (5)', its remainder "Head L3.H7 <- rest".
      hexName: function (label, tokens) {
        var t = parse(label);
        if (!t) return label;
        if (t.where === null) return t.word;
        if (t.source >= 0 || t.rest) return t.word + ' ' + fill(head.where, t) + ' <- ' + (t.rest ? 'rest' : sourceName(t.source, tokens));
        return t.word + ' ' + t.where;
      }
    };
  }

  function sourceName(j, tokens) {  // 'token "Paris" (5)', or 'token 5' where the document has no tokens
    return tokens && j < tokens.length ? 'token ' + shownToken(tokens[j]) + ' (' + j + ')' : 'token ' + j;
  }

  // The prompt's tokens, to name source positions: per sequence or shared, where the document has them.
  function tokensOf(doc, a, seq, row) {
    var t = seq.tokens || a.tokens || doc.tokens;
    if (Array.isArray(t) && Array.isArray(t[0])) t = t[Math.min(row, t.length - 1)];
    return Array.isArray(t) ? t : null;
  }

  // The magnitudes a percent is taken of, by Attribution.top's rule. to_dict records no share, so
  // the page offers both: "top" (HexRay's, `attribute`'s default) the listed terms' summed |value|,
  // "total" every term's. An S_rest is a sum of sources, never listed; under "total" the sources
  // it holds count one by one, as in the full split: the sequence's rest_magnitude (their summed
  // |term|, from to_dict) stands in for the |S_rest| terms (which it bounds from above).
  function magnitudes(terms, values, seq) {
    var single = [], singleSum = 0, restSum = 0;
    values.forEach(function (v, i) {
      if (terms[i] && terms[i].rest) restSum += Math.abs(v);
      else { single.push(i); singleSum += Math.abs(v); }
    });
    var rest = typeof seq.rest_magnitude === 'number' ? seq.rest_magnitude : restSum;
    return { single: single, total: singleSum + rest };
  }

  function byMagnitude(values) {  // term indices by |value|, largest first, ties in label order (a stable sort)
    return function (i, j) { return Math.abs(values[j]) - Math.abs(values[i]) || i - j; };
  }

  function signed(v, digits) { return (v < 0 ? '' : '+') + v.toFixed(digits); }

  function mountAttribution(root, meta) {
    var doc = meta.attribution;
    var grammar = labelGrammar(meta.term_kinds), layerTerm = grammar.layerTerm, hexName = grammar.hexName;
    var entries = doc.steps ? doc.steps.map(function (s) {
      return { title: 'Step ' + s.step, text: s.text, where: 'token ' + s.token_index, a: s.attribution };
    }) : [{ title: null, text: null, where: 'index ' + doc.position, a: doc }];
    var S = { entry: 0, seq: 0, k: 10, share: 'top' };
    var app = { state: S };
    root.rfv = app;
    var head = el('div', 'rfv-head', root);
    el('div', 'rfv-title', head, meta.title);
    el('div', 'rfv-meta', head, (doc.model ? 'model ' + doc.model + ' \u00b7 ' : '') + (doc.prompt !== undefined ? 'prompt ' + shownToken(doc.prompt) : ''));
    var bar = el('div', 'rfv-controls', root);
    select(bar, 'top', 'top_k', ['5', '10', '20', '50'], '10', function (v) { S.k = +v; render(); });
    select(bar, 'percent of', 'share', [['top', 'the listed terms (HexRay)'], ['total', 'all terms']], 'top',
      function (v) { S.share = v; render(); });
    var nseq = entries[0].a.sequences.length;
    if (nseq > 1) select(bar, 'sequence', 'batch', Array.from({ length: nseq }, function (_, i) { return String(i); }), '0', function (v) { S.seq = +v; render(); });
    var steps = null;
    if (doc.steps) {
      steps = el('div', 'rfv-steps', root);
      entries.forEach(function (e, i) {
        var b = el('button', 'rfv-step', steps);
        el('b', '', b, e.title + ' ');
        el('span', '', b, e.text);
        b.addEventListener('click', function () { S.entry = i; render(); });
      });
    }
    var header = el('div', 'rfv-subtitle rfv-target', root);
    var notes = el('div', 'rfv-note', root);
    var bars = el('div', 'rfv-bars', root);
    var gridSec = el('div', 'rfv-section', root);
    var gridTitle = el('div', 'rfv-subtitle', gridSec);
    var grid = null, other = el('div', 'rfv-other', root);
    app.bars = bars;

    function gridTip(r, c) {  // a cell's term, or what it sums, its share of all terms and its largest sources
      var cell = grid.cells_[r * grid.cols + c];
      if (!cell) return null;
      var key = 'L' + r + '.' + grid.cols_[c], sum = grid.sums_[r * grid.cols + c], values = grid.values_;
      var summed = cell.sources.length ? cell.sources.length + ' source terms' + (cell.rest >= 0 ? ' and S_rest' : '')
        : cell.neurons ? cell.neurons + ' neurons' : '';
      var lines = [hexName(key) + ' (' + key + (summed ? ': the sum of ' + summed : '') + ')',
        fmt32(Math.fround(sum)) + '  (' + (grid.total_ ? Math.abs(sum) / grid.total_ * 100 : 0).toFixed(1) + '% of all |terms|)'];
      if (cell.sources.length) {
        var top = cell.sources.slice().sort(byMagnitude(values)).slice(0, 3);
        lines.push('largest sources: ' + top.map(function (i) {
          return sourceName(layerTerm(grid.labels_[i]).source, grid.tokens_) + ' ' + signed(values[i], 3);
        }).join(', '));
      }
      if (cell.rest >= 0) lines.push('the sources not kept (S_rest): ' + signed(values[cell.rest], 3));
      return lines;
    }

    function render() {
      var e = entries[S.entry], a = e.a, si = Math.min(S.seq, a.sequences.length - 1), seq = a.sequences[si];
      if (steps) Array.prototype.forEach.call(steps.children, function (b, i) { b.classList.toggle('rfv-sel', i === S.entry); });
      var values = seq.values, labels = a.labels, terms = labels.map(layerTerm), tokens = tokensOf(doc, a, seq, si);
      var mag = magnitudes(terms, values, seq);
      // A --versus run attributes logit(target) - logit(versus): every label says it is a difference.
      var versus = seq.versus_text != null ? shownToken(seq.versus_text) : null;
      var logitName = versus ? 'logit difference vs ' + versus : 'logit';
      header.textContent = (e.title ? e.title + ': ' + shownToken(e.text) + ' \u2014 ' : '') + 'Token ' + shownToken(seq.target_text) +
        ' (' + e.where + ') \u00b7 ' + logitName + ' ' + seq.logit.toFixed(4) + ' \u00b7 sum of ' + labels.length + ' terms ' + seq.total.toFixed(4);
      var said = [];
      if (a.source_top_k != null) {
        said.push('Sources: each head\'s ' + a.source_top_k + ' largest sources kept' +
          (a.sequences.length > 1 ? ' (in any sequence of the batch)' : '') + '; the rest summed per head ' +
          '(L{i}.H{h}.S_rest: added to its head in the grid, not listed among the bars).');
      }
      if (a.note) said.push(a.note);
      notes.textContent = said.join(' ');
      notes.style.display = said.length ? '' : 'none';
      // HexRay's bars: the k single terms of largest magnitude (no S_rest), as Attribution.top
      var order = mag.single.slice().sort(byMagnitude(values)).slice(0, S.k);
      var topSum = 0;
      order.forEach(function (i) { topSum += Math.abs(values[i]); });
      var of = S.share === 'top' ? topSum : mag.total;
      var longest = order.length ? Math.abs(values[order[0]]) : 1;
      bars.textContent = '';
      el('div', 'rfv-subtitle', bars, 'Top contributors to the ' + logitName + ' (percent of ' + (S.share === 'top'
        ? 'the ' + order.length + ' listed, as HexRay)' : 'all terms\u2019 magnitude' +
          (mag.single.length < labels.length ? ', the sources in S_rest counted one by one)' : ')')));
      var names = order.map(function (i) { return hexName(labels[i], tokens); });
      bars.style.setProperty('--rfv-name', Math.min(Math.max.apply(null, names.map(function (n) { return n.length; }).concat([16])), 48) + 'ch');
      order.forEach(function (i, n) {
        var v = values[i], row = el('div', 'rfv-bar-row', bars);
        row.dataset.label = labels[i];
        el('span', 'rfv-bar-name', row, names[n]);
        var track = el('span', 'rfv-bar-track', row);
        var fill = el('span', 'rfv-bar-fill ' + (v < 0 ? 'rfv-neg' : 'rfv-pos'), track);
        fill.style.width = (longest ? Math.abs(v) / longest * 100 : 0) + '%';
        el('span', 'rfv-bar-value', row, signed(v, 2) + ' (' + (v < 0 ? '-' : '') + (of ? Math.abs(v) / of * 100 : 0).toFixed(1) + '%)');
        row.title = names[n] + '\n' + labels[i] + ' = ' + v;
      });
      // the per-layer grid: heads (or attn) with the MLP term beside them; a head's cell sums its
      // source terms and S_rest, an MLP's its neurons (Attribution.grid), each bias a column of its own
      var nl = 0, nh = 0, perHead = false, has = {};
      terms.forEach(function (t) {
        if (!t) return;
        nl = Math.max(nl, t.layer + 1);
        if (t.head >= 0) { perHead = true; nh = Math.max(nh, t.head + 1); }
        has[t.cell] = true;
        if (t.source >= 0) has.sources = true;
        if (t.rest) has.rest = true;
        if (t.neuron >= 0) has.neurons = true;
      });
      var cols = perHead ? Array.from({ length: nh }, function (_, h) { return 'H' + h; }) : ['attn'];
      if (perHead && has.attn_bias) cols.push('attn_bias');
      cols.push('');  // a gap before the MLP column
      cols.push('mlp');
      if (has.mlp_bias) cols.push('mlp_bias');
      var sums = new Float64Array(nl * cols.length), cells = new Array(nl * cols.length), outside = [];
      terms.forEach(function (t, i) {
        var c = t ? cols.indexOf(t.cell) : -1;
        if (c < 0) { outside.push(i); return; }
        var at = t.layer * cols.length + c, cell = cells[at] || (cells[at] = { terms: 0, sources: [], rest: -1, neurons: 0 });
        sums[at] += values[i];
        cell.terms++;
        if (t.rest) cell.rest = i; else if (t.source >= 0) cell.sources.push(i);
        if (t.neuron >= 0) cell.neurons++;
      });
      var shown = new Float32Array(sums.length).fill(NaN);  // NaN: no term there (drawn white)
      cells.forEach(function (cell, at) { shown[at] = sums[at]; });
      gridTitle.textContent = (perHead ? 'per head' + (has.attn_bias ? ' (and the attention output bias)' : '') : 'attention and MLP') +
        ' per layer, the MLP term beside them' + (has.mlp_bias ? ' (and its output bias)' : '') +
        (has.sources ? '; a head\u2019s cell sums its source terms' + (has.rest ? ' and S_rest' : '') : '') +
        (has.neurons ? '; an MLP\u2019s cell sums its neurons' : '') +
        ' \u2014 ' + (versus ? 'contribution to the ' + logitName + ' (red: toward the token rather than ' + versus + ', blue: against)'
          : 'logit contribution (red: toward the token, blue: against)');
      if (!grid) {
        grid = new Heatmap(gridSec, {
          height: Math.min(Math.max(nl * 18 + 44, 180), 760), maxCellW: 44, maxCellH: 20, zoom: false, left: 48,
          nanRgb: [255, 255, 255], rowLabel: function (r) { return 'L' + r; },
          colLabel: function (c) { var n = grid.cols_[c]; return n === 'attn_bias' || n === 'mlp_bias' ? 'bias' : n === 'mlp' ? 'MLP' : n; },
          tooltip: gridTip
        });
        app.grid = grid;
      }
      Object.assign(grid, { cols_: cols, cells_: cells, sums_: sums, labels_: labels, values_: values, tokens_: tokens, total_: mag.total });
      var gs = groupStats([{ values: shown, cols: cols.length }], nl, false);
      grid.set(shown, nl, cols.length, { kind: 'div', log: false, perRow: false }, gs);
      other.textContent = '';
      if (outside.length) {
        el('div', 'rfv-subtitle', other, 'terms outside the grid');
        outside.forEach(function (i) { el('div', 'rfv-other-row', other, hexName(labels[i], tokens) + ': ' + signed(values[i], 4)); });
      }
    }
    render();
    return app;
  }

  window.ReconFastView = {
    mount: function (root, meta, b64) {
      var started = performance.now();
      var app = meta.kind === 'attribution' ? mountAttribution(root, meta) : mountCube(root, meta, decodeFloat32(b64));
      app.mountMs = performance.now() - started;
      root.dataset.rendered = '1';
      return app;
    },
    fmt32: fmt32
  };
})();
