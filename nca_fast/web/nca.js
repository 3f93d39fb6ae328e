// nca_fast's WebGL2 NCA: the spec's step (filters, padding, per-cell MLP, clamps, fire rate, alive
// masks) in fragment shaders generated from the model's spec. State: C channels in ceil(C/4) RGBA32F
// textures (row r of the grid is texel row r), written by one pass with a render target per texture.
// Weights: one RGBA32F texture (w1 rows, b1, w2 rows, b2, each padded to 4-float texels).
"use strict";
(function () {
  const M = window.NCA_MODEL;  // {spec, height, width, weights: {w1, b1, w2, b2} base64 float32}
  const spec = M.spec, C = spec.channels, HID = spec.hidden, F = spec.filters.length;
  const T = Math.ceil(C / 4), FC = F * C, Q = Math.ceil(FC / 4), HQ = Math.ceil(HID / 4);
  const canvas = document.getElementById("view");
  const status = document.getElementById("status");
  const gl = canvas.getContext("webgl2", {antialias: false, preserveDrawingBuffer: true});
  function fail(msg) { status.textContent = "error: " + msg; throw new Error(msg); }
  if (!gl) fail("this browser has no WebGL2");
  if (!gl.getExtension("EXT_color_buffer_float")) fail("this browser cannot render to float textures");
  if (T > gl.getParameter(gl.MAX_DRAW_BUFFERS)) fail(`${C} channels need ${T} render targets`);

  function floats(b64) {
    const s = atob(b64), u = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
    return new Float32Array(u.buffer);
  }
  const W1 = floats(M.weights.w1), W2 = floats(M.weights.w2);
  const B1 = M.weights.b1 ? floats(M.weights.b1) : new Float32Array(HID);
  const B2 = M.weights.b2 ? floats(M.weights.b2) : new Float32Array(C);

  // ---- weights texture: [w1: HID x Q][b1: HQ][w2: C x HQ][b2: T] texels, 256 texels a row ----------
  const oB1 = HID * Q, oW2 = oB1 + HQ, oB2 = oW2 + C * HQ, NTEX = oB2 + T, WW = 256;
  const wdata = new Float32Array(Math.ceil(NTEX / WW) * WW * 4);
  for (let j = 0; j < HID; j++) for (let k = 0; k < FC; k++) wdata[(j * Q) * 4 + k] = W1[j * FC + k];
  for (let j = 0; j < HID; j++) wdata[oB1 * 4 + j] = B1[j];
  for (let c = 0; c < C; c++) for (let j = 0; j < HID; j++) wdata[(oW2 + c * HQ) * 4 + j] = W2[c * HID + j];
  for (let c = 0; c < C; c++) wdata[oB2 * 4 + c] = B2[c];

  // ---- shaders ---------------------------------------------------------------------------------------
  const f = (v) => (Number.isInteger(v) ? v.toFixed(1) : String(v));
  const PAD = {zeros: 0, circular: 1, replicate: 2}[spec.padding];
  const ALIVE_PAD = spec.alive_padding || (spec.padding === "zeros" ? "ignore" : spec.padding);
  const samplers = Array.from({length: T}, (_, t) => `uniform highp sampler2D uX${t};`).join("\n");
  const head = `#version 300 es
precision highp float; precision highp int; precision highp sampler2D;
uniform ivec2 uSize;
${samplers}
vec4 fetchT(int t, ivec2 p) {
${Array.from({length: T}, (_, t) => `  if (t == ${t}) return texelFetch(uX${t}, p, 0);`).join("\n")}
  return vec4(0.0);
}
// A neighbour's texels under the perception padding (0 zeros, 1 circular, 2 replicate).
bool inside(ivec2 p) { return p.x >= 0 && p.y >= 0 && p.x < uSize.x && p.y < uSize.y; }
ivec2 wrapP(ivec2 p) { return ivec2((p.x % uSize.x + uSize.x) % uSize.x, (p.y % uSize.y + uSize.y) % uSize.y); }
vec4 neighbour(int t, ivec2 p, int pad) {
  if (inside(p)) return fetchT(t, p);
  if (pad == 0) return vec4(0.0);
  if (pad == 1) return fetchT(t, wrapP(p));
  return fetchT(t, clamp(p, ivec2(0), uSize - 1));
}
float chan(vec4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
`;
  function clampExpr(v, r) { return r ? `clamp(${v}, ${f(r[0])}, ${f(r[1])})` : v; }
  // Perception, unrolled from the filter taps (zero taps skipped): p[f*C + c].
  let perc = "";
  for (let dy = -1; dy <= 1; dy++) for (let dx = -1; dx <= 1; dx++) {
    const used = spec.filters.some((fl) => fl.taps[dy + 1][dx + 1] !== 0);
    if (!used) continue;
    perc += `  { ivec2 q = cell + ivec2(${dx}, ${dy});\n`;
    for (let t = 0; t < T; t++) perc += `    vec4 n${t} = neighbour(${t}, q, ${PAD});\n`;
    spec.filters.forEach((fl, fi) => {
      const w = fl.taps[dy + 1][dx + 1];
      if (w === 0) return;
      for (let c = 0; c < C; c++) perc += `    p[${fi * C + c}] += ${f(w)} * n${c >> 2}.${"xyzw"[c & 3]};\n`;
    });
    perc += "  }\n";
  }
  const stepFS = `${head}
uniform highp sampler2D uW;
uniform float uFire; uniform uint uSeed; uniform uint uStep;
${Array.from({length: T}, (_, t) => `layout(location = ${t}) out vec4 o${t};`).join("\n")}
vec4 W(int i) { return texelFetch(uW, ivec2(i % ${WW}, i / ${WW}), 0); }
uint hash(uint x) { x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16; return x; }
void main() {
  ivec2 cell = ivec2(gl_FragCoord.xy);
  float p[${Q * 4}];
  for (int i = 0; i < ${Q * 4}; i++) p[i] = 0.0;
${perc}
  vec4 pv[${Q}];
  for (int q = 0; q < ${Q}; q++) pv[q] = ${clampExpr(`vec4(p[4 * q], p[4 * q + 1], p[4 * q + 2], p[4 * q + 3])`, spec.perception_clamp)};
  float h[${HQ * 4}];
  for (int j = 0; j < ${HQ * 4}; j++) h[j] = 0.0;
  for (int j = 0; j < ${HID}; j++) {
    float a = chan(W(${oB1} + j / 4), j % 4);
    for (int q = 0; q < ${Q}; q++) a += dot(W(j * ${Q} + q), pv[q]);
    h[j] = ${clampExpr("max(a, 0.0)", spec.hidden_clamp)};
  }
  uint r = hash(uint(cell.x) * 0x9E3779B9u ^ hash(uint(cell.y) * 0x85EBCA6Bu ^ hash(uStep ^ hash(uSeed))));
  float fire = (float(r >> 8) / 16777216.0) < uFire ? 1.0 : 0.0;
  float y[${T * 4}];
  for (int c = 0; c < ${C}; c++) {
    float d = chan(W(${oB2} + c / 4), c % 4);
    for (int q = 0; q < ${HQ}; q++) d += dot(W(${oW2} + c * ${HQ} + q), vec4(h[4 * q], h[4 * q + 1], h[4 * q + 2], h[4 * q + 3]));
    d = ${clampExpr("d", spec.update_clamp)};
    float x = chan(fetchT(c / 4, cell), c % 4);
    y[c] = ${clampExpr(`x + d * ${f(spec.step_size)} * fire`, spec.state_clamp)};
  }
  for (int c = ${C}; c < ${T * 4}; c++) y[c] = 0.0;
${Array.from({length: T}, (_, t) => `  o${t} = vec4(y[${4 * t}], y[${4 * t + 1}], y[${4 * t + 2}], y[${4 * t + 3}]);`).join("\n")}
}`;
  const A = spec.alive_channel;
  const aliveFS = A === null ? null : `${head}
${Array.from({length: T}, (_, t) => `uniform highp sampler2D uY${t};`).join("\n")}
${Array.from({length: T}, (_, t) => `layout(location = ${t}) out vec4 o${t};`).join("\n")}
vec4 fetchY(int t, ivec2 p) {
${Array.from({length: T}, (_, t) => `  if (t == ${t}) return texelFetch(uY${t}, p, 0);`).join("\n")}
  return vec4(0.0);
}
// maxpool3x3(alpha) > threshold; the pool pads by the alive padding ("ignore": outside never counts).
bool alive(bool useY, ivec2 cell) {
  float m = -1e30;
  for (int dy = -1; dy <= 1; dy++) for (int dx = -1; dx <= 1; dx++) {
    ivec2 q = cell + ivec2(dx, dy);
    if (!inside(q)) {
      ${ALIVE_PAD === "ignore" ? "continue;" : ALIVE_PAD === "circular" ? "q = wrapP(q);" : "q = clamp(q, ivec2(0), uSize - 1);"}
    }
    vec4 v = useY ? fetchY(${A >> 2}, q) : fetchT(${A >> 2}, q);
    m = max(m, v.${"xyzw"[A & 3]});
  }
  return m > ${f(spec.alive_threshold)};
}
void main() {
  ivec2 cell = ivec2(gl_FragCoord.xy);
  float keep = (alive(false, cell) && alive(true, cell)) ? 1.0 : 0.0;
${Array.from({length: T}, (_, t) => `  o${t} = fetchY(${t}, cell) * keep;`).join("\n")}
}`;
  const renderFS = `${head}
uniform vec2 uCanvas;
out vec4 color;
void main() {
  ivec2 cell = ivec2(int(gl_FragCoord.x * float(uSize.x) / uCanvas.x),
                     uSize.y - 1 - int(gl_FragCoord.y * float(uSize.y) / uCanvas.y));
  vec4 x = fetchT(0, cell);
  vec3 rgb = ${spec.render === "rgba_premultiplied" ? "1.0 - clamp(x.w, 0.0, 1.0) + x.xyz" :
      `x.xyz * ${f(spec.render_scale)} + ${f(spec.render_offset)}`};
  color = vec4(clamp(rgb, 0.0, 1.0), 1.0);
}`;
  const brushFS = `${head}
uniform vec3 uBrush; uniform int uSeedMode;
${Array.from({length: T}, (_, t) => `layout(location = ${t}) out vec4 o${t};`).join("\n")}
void main() {
  ivec2 cell = ivec2(gl_FragCoord.xy);
  vec2 d = vec2(cell) + 0.5 - uBrush.xy;
  bool hit = dot(d, d) <= uBrush.z * uBrush.z;
${Array.from({length: T}, (_, t) => `  o${t} = hit ? vec4(0.0) : fetchT(${t}, cell);`).join("\n")}
  if (uSeedMode == 1 && all(equal(cell, ivec2(uBrush.xy)))) {
${Array.from({length: T}, (_, t) => `    o${t} = vec4(${[0, 1, 2, 3].map((i) => (4 * t + i >= (A === null ? 3 : A) && 4 * t + i < C ? "1.0" : "0.0")).join(", ")});`).join("\n")}
  }
}`;
  const vs = `#version 300 es
void main() { vec2 p = vec2((gl_VertexID << 1) & 2, gl_VertexID & 2); gl_Position = vec4(p * 2.0 - 1.0, 0.0, 1.0); }`;

  function program(fs) {
    const pr = gl.createProgram();
    for (const [type, src] of [[gl.VERTEX_SHADER, vs], [gl.FRAGMENT_SHADER, fs]]) {
      const s = gl.createShader(type);
      gl.shaderSource(s, src);
      gl.compileShader(s);
      if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) fail("shader: " + gl.getShaderInfoLog(s));
      gl.attachShader(pr, s);
    }
    gl.linkProgram(pr);
    if (!gl.getProgramParameter(pr, gl.LINK_STATUS)) fail("link: " + gl.getProgramInfoLog(pr));
    return pr;
  }
  const progs = {step: program(stepFS), render: program(renderFS), brush: program(brushFS),
                 alive: aliveFS ? program(aliveFS) : null};

  // ---- state textures ------------------------------------------------------------------------------
  let H = M.height, Wd = M.width;
  function texture(w, h, data) {
    const tx = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D, tx);
    gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA32F, w, h, 0, gl.RGBA, gl.FLOAT, data || null);
    for (const k of [gl.TEXTURE_MIN_FILTER, gl.TEXTURE_MAG_FILTER]) gl.texParameteri(gl.TEXTURE_2D, k, gl.NEAREST);
    return tx;
  }
  const wtex = texture(WW, wdata.length / 4 / WW, wdata);
  function stateSet() {
    const texs = Array.from({length: T}, () => texture(Wd, H, null));
    const fb = gl.createFramebuffer();
    gl.bindFramebuffer(gl.FRAMEBUFFER, fb);
    texs.forEach((tx, t) => gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0 + t, gl.TEXTURE_2D, tx, 0));
    return {texs, fb};
  }
  let cur = stateSet(), nxt = stateSet(), tmp = stateSet();

  function upload(set, hwc) {  // hwc: Float32Array [H, W, C]
    for (let t = 0; t < T; t++) {
      const d = new Float32Array(H * Wd * 4);
      for (let i = 0; i < H * Wd; i++) for (let k = 0; k < 4 && 4 * t + k < C; k++) d[4 * i + k] = hwc[i * C + 4 * t + k];
      gl.bindTexture(gl.TEXTURE_2D, set.texs[t]);
      gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA32F, Wd, H, 0, gl.RGBA, gl.FLOAT, d);
    }
  }
  function download(set) {
    const out = new Float32Array(H * Wd * C), d = new Float32Array(H * Wd * 4);
    gl.bindFramebuffer(gl.FRAMEBUFFER, set.fb);
    for (let t = 0; t < T; t++) {
      gl.readBuffer(gl.COLOR_ATTACHMENT0 + t);
      gl.readPixels(0, 0, Wd, H, gl.RGBA, gl.FLOAT, d);
      for (let i = 0; i < H * Wd; i++) for (let k = 0; k < 4 && 4 * t + k < C; k++) out[i * C + 4 * t + k] = d[4 * i + k];
    }
    return out;
  }
  function seedState() {
    const s = new Float32Array(H * Wd * C);
    if (spec.seed_kind === "center") {
      const first = A === null ? 3 : A, i = (H >> 1) * Wd + (Wd >> 1);
      for (let c = first; c < C; c++) s[i * C + c] = 1.0;
    }
    return s;
  }

  function bindInputs(pr, set, prefix, unit0) {
    for (let t = 0; t < T; t++) {
      gl.activeTexture(gl.TEXTURE0 + unit0 + t);
      gl.bindTexture(gl.TEXTURE_2D, set.texs[t]);
      gl.uniform1i(gl.getUniformLocation(pr, prefix + t), unit0 + t);
    }
    gl.uniform2i(gl.getUniformLocation(pr, "uSize"), Wd, H);
  }
  function pass(pr, out, setup) {
    gl.useProgram(pr);
    gl.bindFramebuffer(gl.FRAMEBUFFER, out ? out.fb : null);
    if (out) gl.drawBuffers(Array.from({length: T}, (_, t) => gl.COLOR_ATTACHMENT0 + t));
    gl.viewport(0, 0, out ? Wd : canvas.width, out ? H : canvas.height);
    setup(pr);
    gl.drawArrays(gl.TRIANGLES, 0, 3);
  }

  let stepCount = 0, fireRate = spec.fire_rate, seed = (Math.random() * 4294967295) >>> 0;
  function step() {
    const target = A === null ? nxt : tmp;
    pass(progs.step, target, (pr) => {
      bindInputs(pr, cur, "uX", 0);
      gl.activeTexture(gl.TEXTURE0 + 8);
      gl.bindTexture(gl.TEXTURE_2D, wtex);
      gl.uniform1i(gl.getUniformLocation(pr, "uW"), 8);
      gl.uniform1f(gl.getUniformLocation(pr, "uFire"), fireRate);
      gl.uniform1ui(gl.getUniformLocation(pr, "uSeed"), seed);
      gl.uniform1ui(gl.getUniformLocation(pr, "uStep"), stepCount >>> 0);
    });
    if (A !== null) {
      pass(progs.alive, nxt, (pr) => { bindInputs(pr, cur, "uX", 0); bindInputs(pr, tmp, "uY", 8); });
    }
    [cur, nxt] = [nxt, cur];
    stepCount++;
  }
  function render() {
    pass(progs.render, null, (pr) => {
      bindInputs(pr, cur, "uX", 0);
      gl.uniform2f(gl.getUniformLocation(pr, "uCanvas"), canvas.width, canvas.height);
    });
  }
  function brush(cx, cy, radius, seedMode) {
    pass(progs.brush, nxt, (pr) => {
      bindInputs(pr, cur, "uX", 0);
      gl.uniform3f(gl.getUniformLocation(pr, "uBrush"), cx, cy, radius);
      gl.uniform1i(gl.getUniformLocation(pr, "uSeedMode"), seedMode ? 1 : 0);
    });
    [cur, nxt] = [nxt, cur];
  }
  function reset() { upload(cur, seedState()); stepCount = 0; }

  // ---- the page: controls, brush, frame loop ---------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  let paused = false, frames = 0, updates = 0, t0 = performance.now();
  $("pause").onclick = () => { paused = !paused; $("pause").textContent = paused ? "run" : "pause"; };
  $("step").onclick = () => { step(); render(); };
  $("reset").onclick = () => { reset(); render(); };
  function cellAt(ev) {
    const r = canvas.getBoundingClientRect();
    return [(ev.clientX - r.left) / r.width * Wd, H - (ev.clientY - r.top) / r.height * H];
  }
  let drawing = false;
  canvas.addEventListener("pointerdown", (ev) => { drawing = true; paint(ev); });
  canvas.addEventListener("pointerup", () => { drawing = false; });
  canvas.addEventListener("pointermove", (ev) => { if (drawing) paint(ev); });
  function paint(ev) {
    const [x, y] = cellAt(ev);
    const seedMode = ev.shiftKey && A !== null;
    brush(seedMode ? Math.floor(x) : x, seedMode ? Math.floor(y) : y, seedMode ? 0.5 : Number($("radius").value),
          seedMode);
    render();
  }
  function frame() {
    if (!paused && !window.NCA_TEST_MODE) {
      const n = Number($("spf").value);
      for (let i = 0; i < n; i++) step();
      updates += n * H * Wd;
      render();
      frames++;
    }
    const now = performance.now();
    if (now - t0 > 500) {
      status.textContent = `${(frames * 1000 / (now - t0)).toFixed(0)} frames/s, ` +
        `${(updates / (now - t0) / 1e3).toFixed(2)} M cell-updates/s, step ${stepCount}`;
      frames = 0; updates = 0; t0 = now;
    }
    requestAnimationFrame(frame);
  }
  reset();
  render();
  requestAnimationFrame(frame);

  // ---- test hook: a fixed state in, n steps with a given fire rate, the state out -------------------
  window.ncaTest = {
    channels: C, height: H, width: Wd,
    setState: (arr) => { upload(cur, new Float32Array(arr)); },
    getState: () => Array.from(download(cur)),
    setFireRate: (r) => { fireRate = r; },
    step: (n) => { for (let i = 0; i < n; i++) step(); gl.finish(); },
    brush: (x, y, r) => { brush(x, y, r, false); },
  };
  status.textContent = "ready";
})();
