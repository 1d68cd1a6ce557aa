// AudioWorklet: microphone (context rate, first channel) -> 16 kHz mono PCM16 chunks.
//
// A windowed-sinc low-pass (cut-off just under the target Nyquist) runs at the input rate,
// then linear interpolation picks the output samples. Each chunk (20 ms = 320 samples by
// default) is posted to the main thread as a transferable Int16Array.

const TAPS = 31;

function lowPassKernel(cutoff) {
  // cutoff: fraction of the input sample rate (0..0.5). Blackman-windowed sinc, unit DC gain.
  const kernel = new Float32Array(TAPS);
  const mid = (TAPS - 1) / 2;
  let sum = 0;
  for (let i = 0; i < TAPS; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const window =
      0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (TAPS - 1)) +
      0.08 * Math.cos((4 * Math.PI * i) / (TAPS - 1));
    kernel[i] = sinc * window;
    sum += kernel[i];
  }
  for (let i = 0; i < TAPS; i++) kernel[i] /= sum;
  return kernel;
}

class Pcm16Resampler extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.targetRate = opts.targetRate || 16000;
    this.chunkSamples = Math.round((this.targetRate * (opts.chunkMs || 20)) / 1000);
    this.step = sampleRate / this.targetRate; // input samples per output sample
    this.filter = this.step > 1 ? lowPassKernel((0.45 / this.step)) : null;
    this.history = new Float32Array(TAPS); // ring of the last TAPS raw inputs
    this.historyPos = 0;
    this.prev = 0; // last filtered input sample
    this.pos = 0; // position of the next output sample, in input samples after `prev`
    this.chunk = new Int16Array(this.chunkSamples);
    this.filled = 0;
  }

  filtered(sample) {
    if (!this.filter) return sample;
    this.history[this.historyPos] = sample;
    this.historyPos = (this.historyPos + 1) % TAPS;
    let acc = 0;
    for (let i = 0; i < TAPS; i++) acc += this.filter[i] * this.history[(this.historyPos + i) % TAPS];
    return acc;
  }

  emit(value) {
    const clipped = Math.max(-1, Math.min(1, value));
    this.chunk[this.filled++] = clipped < 0 ? clipped * 0x8000 : clipped * 0x7fff;
    if (this.filled === this.chunkSamples) {
      this.port.postMessage(this.chunk, [this.chunk.buffer]);
      this.chunk = new Int16Array(this.chunkSamples);
      this.filled = 0;
    }
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true; // no input connected yet (or the track ended): keep alive
    for (let i = 0; i < channel.length; i++) {
      const current = this.filtered(channel[i]);
      // Output samples that fall between `prev` (pos 0) and `current` (pos 1).
      while (this.pos <= 1) {
        this.emit(this.prev + (current - this.prev) * this.pos);
        this.pos += this.step;
      }
      this.pos -= 1;
      this.prev = current;
    }
    return true;
  }
}

registerProcessor("pcm16-resampler", Pcm16Resampler);
