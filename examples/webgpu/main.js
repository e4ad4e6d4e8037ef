// Runs one packed matrix of an xbitc WebGPU bundle (`xbitc export ART --webgpu DIR --check NAME`) in the browser:
// the gather + gemv and gather + gemm kernels on check.json's activations, compared with its float64 reference
// within the float32 rounding bound it carries. Everything (bindings, parameter layout, workgroup counts) comes
// from model.json, as xbitc/webgpu/export.py's docstring describes. The result is one line, in the page and on the
// console: "xbitc-webgpu: ok ...", "xbitc-webgpu: FAIL ..." or "xbitc-webgpu: no WebGPU adapter (...)".

const PREFIX = "xbitc-webgpu:";
const FORMAT = "xbitc-webgpu";
const VERSION = 1;
const ROLES = ["gemv", "gemm"];

function report(text) {
  const line = `${PREFIX} ${text}`;
  console.log(line);
  document.getElementById("result").textContent = line;
  document.title = line;
  return line;
}

async function get(url, as) {
  const response = await fetch(url);
  if (!response.ok) {
    throw new Error(`${url}: HTTP ${response.status}; give the folder \`xbitc export ART --webgpu DIR --check NAME\` ` +
                    "wrote as ?bundle=URL");
  }
  return as === "json" ? response.json() : response.arrayBuffer();
}

const ceilDiv = (a, b) => Math.ceil(a / b);

// (parameters, workgroups) of a call: a parameter named `tokens` is the batch, any other the matrix constant of
// its name; the workgroup counts are GpuMatrix.gather_args / product_args (backends/gpu/packed.py).
function callArgs(info, role, m, tokens, tile) {
  const params = Object.fromEntries(info.params.map((p) => [p.name, p.name === "tokens" ? tokens : m[p.name]]));
  const tiles = ceilDiv(tokens, tile);
  const groups = role === "gather" ? [ceilDiv(m.xcols, info.workgroup[0]), tiles * tile] : [m.row_blocks, tiles];
  return [params, groups];
}

function packParams(info, values) {
  const raw = new ArrayBuffer(info.params_bytes);
  const view = new DataView(raw);
  for (const p of info.params) {
    const set = { u32: "setUint32", i32: "setInt32", f32: "setFloat32" }[p.type];
    if (!set) throw new Error(`${info.name}: parameter ${p.name} has type ${p.type}, which this page cannot pack`);
    view[set](p.offset, values[p.name], true);
  }
  return raw;
}

async function pipeline(device, info, wgsl) {
  const { offset, bytes } = info.source;
  const code = new TextDecoder().decode(wgsl.subarray(offset, offset + bytes));
  const module = device.createShaderModule({ code, label: info.name });
  const errors = (await module.getCompilationInfo()).messages.filter((m) => m.type === "error");
  if (errors.length) {
    const e = errors[0];
    throw new Error(`WGSL kernel ${info.name}, line ${e.lineNum}, column ${e.linePos}: ${e.message}`);
  }
  // an explicit layout from the interface: "auto" would drop a binding the shader never reads
  const entries = info.buffers.map((b, i) => ({
    binding: i, visibility: GPUShaderStage.COMPUTE, buffer: { type: b.write ? "storage" : "read-only-storage" },
  }));
  if (info.params.length) {
    entries.push({ binding: entries.length, visibility: GPUShaderStage.COMPUTE, buffer: { type: "uniform" } });
  }
  const group = device.createBindGroupLayout({ entries });
  const gpu = await device.createComputePipelineAsync({
    layout: device.createPipelineLayout({ bindGroupLayouts: [group] }),
    compute: { module, entryPoint: info.name },
  });
  return { info, gpu, group };
}

function buffer(device, data, usage) {
  const size = Math.max(16, ceilDiv(typeof data === "number" ? data : data.byteLength, 16) * 16);
  const buf = device.createBuffer({ size, usage, mappedAtCreation: typeof data !== "number" });
  if (typeof data !== "number") {
    new Uint8Array(buf.getMappedRange()).set(new Uint8Array(data.buffer ?? data, data.byteOffset ?? 0,
                                                             data.byteLength));
    buf.unmap();
  }
  return buf;
}

// y [tokens, rows] of matrix m on x through gather + the product kernel of `role`, one submission
async function product(device, model, pipes, arrays, m, role, x, tokens) {
  const S = GPUBufferUsage;
  const tile = model.kernels[role].tile;
  const xp = buffer(device, 4 * ceilDiv(tokens, tile) * tile * m.xcols, S.STORAGE);
  const y = buffer(device, new Float32Array(tokens * m.rows).fill(NaN), S.STORAGE | S.COPY_SRC);
  const calls = [["gather", { x: buffer(device, x, S.STORAGE), xp }], [role, { xp, y }]];
  device.pushErrorScope("validation");
  const enc = device.createCommandEncoder();
  const pass = enc.beginComputePass();
  for (const [r, own] of calls) {
    const { info, gpu, group } = pipes[r];
    const [params, groups] = callArgs(info, r, m, tokens, tile);
    const entries = info.buffers.map((b, i) => ({
      binding: i, resource: { buffer: b.name in model.bind ? arrays[model.bind[b.name]] : own[b.name] },
    }));
    if (info.params.length) {
      const ub = buffer(device, packParams(info, params), S.UNIFORM);
      entries.push({ binding: entries.length, resource: { buffer: ub } });
    }
    pass.setPipeline(gpu);
    pass.setBindGroup(0, device.createBindGroup({ layout: group, entries }));
    pass.dispatchWorkgroups(...groups);
  }
  pass.end();
  const bytes = tokens * m.rows * 4;
  const back = device.createBuffer({ size: Math.max(16, ceilDiv(bytes, 16) * 16),
                                     usage: S.MAP_READ | S.COPY_DST });
  enc.copyBufferToBuffer(y, 0, back, 0, back.size);
  device.queue.submit([enc.finish()]);
  const err = await device.popErrorScope();
  if (err) throw new Error(`${role}: ${err.message}`);
  await back.mapAsync(GPUMapMode.READ);
  const out = new Float32Array(back.getMappedRange().slice(0, bytes));
  back.unmap();
  return out;
}

export async function main() {
  const query = new URLSearchParams(location.search);
  let base = query.get("bundle") || "bundle/";
  if (!base.endsWith("/")) base += "/";
  const url = (name) => new URL(name, new URL(base, location.href)).href;
  if (!navigator.gpu) {
    return report("no WebGPU adapter (navigator.gpu is missing: WebGPU is off in this browser, or the page is not " +
                  "served from localhost or https)");
  }
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) {
    return report("no WebGPU adapter (requestAdapter() gave none: on Linux without a GPU start Chromium with " +
                  "--enable-unsafe-webgpu)");
  }
  const info = adapter.info ?? {};
  const name = [info.vendor, info.architecture, info.description].filter(Boolean).join(" ") || "unnamed";
  try {
    const [model, wgsl, weights, check] = await Promise.all([
      get(url("model.json"), "json"), get(url("kernels.wgsl")).then((b) => new Uint8Array(b)),
      get(url("weights.bin")), get(url("check.json"), "json")]);
    if (model.format !== FORMAT || model.version !== VERSION) {
      throw new Error(`model.json is ${model.format} version ${model.version}; this page reads ${FORMAT} ` +
                      `version ${VERSION} (export the bundle again with this xbitc)`);
    }
    const m = model.matrices.find((mm) => mm.name === check.matrix);
    if (!m) throw new Error(`check.json names ${check.matrix}, which model.json does not hold`);
    const needs = ["maxStorageBufferBindingSize", "maxBufferSize"];
    const device = await adapter.requestDevice({
      requiredLimits: Object.fromEntries(needs.map((k) => [k, adapter.limits[k]])) });
    device.lost.then((lost) => lost.reason !== "destroyed" && report(`FAIL device lost: ${lost.message}`));
    const pipes = {};
    for (const role of ["gather", ...ROLES]) pipes[role] = await pipeline(device, model.kernels[role], wgsl);
    const arrays = Object.fromEntries(Object.entries(m.arrays).map(([part, r]) =>
      [part, buffer(device, new Uint8Array(weights, r.offset, r.bytes), GPUBufferUsage.STORAGE)]));

    const tokens = check.tokens;
    const x = new Float32Array(check.x);
    const tol = check.absum.map((a) => check.roundings * check.unit_roundoff * a + 1e-30);
    let maxErr = 0, ratio = 0;
    for (const role of tokens > 1 ? ROLES : ["gemv"]) {
      const y = await product(device, model, pipes, arrays, m, role, x, tokens);
      let bad = 0, worst = -1, worstRatio = 0;
      for (let i = 0; i < y.length; i++) {
        const err = Math.abs(y[i] - check.y[i]), r = err / tol[i];  // NaN (an output never written) fails
        if (!(r <= 1)) {
          bad++;
          if (worst < 0 || !(r <= worstRatio)) [worst, worstRatio] = [i, r];
        } else {
          maxErr = Math.max(maxErr, err);
          ratio = Math.max(ratio, r);
        }
      }
      if (bad) {
        const t = Math.floor(worst / m.rows), r = worst % m.rows;
        return report(`FAIL matrix=${m.name} ${role}: ${bad} of ${y.length} outputs outside the float32 bound; ` +
                      `token ${t} row ${r}: got ${y[worst]}, want ${check.y[worst]}, tol ${tol[worst].toExponential(2)}`);
      }
    }
    device.destroy();
    const tolMin = Math.min(...tol);
    return report(`ok matrix=${m.name} tokens=${tokens} rows=${m.rows} kernels=gather,${ROLES.join(",")} ` +
                  `max_err=${maxErr.toExponential(2)} tol_min=${tolMin.toExponential(2)} worst_err/tol=` +
                  `${ratio.toExponential(2)} adapter=${name.replaceAll(" ", "_")}`);
  } catch (err) {
    return report(`FAIL ${err.message ?? err}`);
  }
}
