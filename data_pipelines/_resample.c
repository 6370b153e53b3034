/* Antialiased linear ("triangle") resizing of uint8 images, for the tf.data input pipeline.
 *
 * The filter is the one of tf.image.resize(antialias=True) and of PIL's BILINEAR resize: output
 * pixel j of an axis resized from n to m pixels is centred at input coordinate
 * (j + 0.5) * n / m - 0.5, and input pixel i weighs max(0, 1 - |i - centre| / s) with
 * s = max(n / m, 1), the weights of each output pixel normalised to sum to one. With integer
 * numerators that weight is proportional to max(0, 2 max(n, m) - |(2j + 1) n - (2i + 1) m|),
 * which is how it is computed here: exactly, then divided once in float32, as
 * fashion_jax.search.model computes it on the accelerator.
 *
 * Columns are filtered first (one output row at a time, vectorised along the whole row), then
 * rows, in float32; the result is rounded half to even and clipped to [0, 255], as
 * tf.round + tf.clip_by_value do. TensorFlow's kernel filters in the same order and precision,
 * so the two agree except, rarely, by one grey level on a value that sits on .5.
 *
 * resize(src, height, width, channels, out, out_height, out_width): src is a C-contiguous
 * uint8 buffer of height x width x channels, out a writable one of
 * out_height x out_width x channels. The GIL is released while resizing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Built for the baseline instruction set everywhere; on x86-64 Linux with GCC also for AVX2 +
 * FMA, the version chosen when the module is loaded on a CPU that has them. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSIONED __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MULTIVERSIONED
#endif

/* The taps of one axis: output pixel j reads `taps` input pixels from first[j], with weights
 * weights[j * taps + k] (zero past the ones that fall inside the image). */
typedef struct {
  int taps;
  int *first;
  float *weights;
} Spans;

static void free_spans(Spans *spans) {
  free(spans->first);
  free(spans->weights);
  spans->first = NULL;
  spans->weights = NULL;
}

static int make_spans(int64_t in, int64_t out, Spans *spans) {
  const int64_t widest = in > out ? in : out;
  /* |(2j + 1) n - (2i + 1) m| < 2 max(n, m) holds for at most ceil(2 max(n, m) / m) values
   * of i (an open interval of that length). */
  int64_t taps = (2 * widest + out - 1) / out;
  if (taps > in) taps = in;
  spans->taps = (int)taps;
  spans->first = malloc(sizeof(int) * (size_t)out);
  spans->weights = calloc((size_t)(out * taps), sizeof(float));
  int64_t *numerators = malloc(sizeof(int64_t) * (size_t)taps);
  if (spans->first == NULL || spans->weights == NULL || numerators == NULL) {
    free(numerators);
    free_spans(spans);
    return -1;
  }
  for (int64_t j = 0; j < out; ++j) {
    const int64_t centre = (2 * j + 1) * in; /* in units of 1 / (2m) input pixels */
    /* The first pixel i of the support, (2i + 1) m > centre - 2 max(n, m), moved left where
     * the window would pass the image's end (the extra taps weigh nothing). */
    const int64_t low = centre - 2 * widest;
    int64_t first = low < out ? 0 : (low - out) / (2 * out);
    while ((2 * first + 1) * out <= low) ++first;
    if (first > in - taps) first = in - taps;
    int64_t total = 0;
    for (int64_t k = 0; k < taps; ++k) {
      int64_t distance = centre - (2 * (first + k) + 1) * out;
      if (distance < 0) distance = -distance;
      numerators[k] = distance < 2 * widest ? 2 * widest - distance : 0;
      total += numerators[k];
    }
    spans->first[j] = (int)first;
    for (int64_t k = 0; k < taps; ++k) {
      spans->weights[j * taps + k] = (float)numerators[k] / (float)total;
    }
  }
  free(numerators);
  return 0;
}

/* Four float lanes; GCC and Clang lower these to SSE (or wider) registers on every target. */
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

static inline f32x4 load4(const float *p) {
  f32x4 v;
  memcpy(&v, p, sizeof v);
  return v;
}

/* Clipped to [0, 255] and rounded half to even, as tf.clip_by_value and tf.round give in either
 * order for whole-number bounds. Adding and taking away 1.5 * 2^23 rounds a float in [0, 2^22)
 * to a whole number in the default rounding mode, which is half to even. */
static inline uint8_t to_level(float value) {
  value = value < 0.0f ? 0.0f : (value > 255.0f ? 255.0f : value);
  return (uint8_t)(int32_t)((value + 12582912.0f) - 12582912.0f);
}

/* Column filter of output row y: the weighted source rows, into line[0 .. stride). The loop
 * runs along the whole row, so it vectorises. */
static inline __attribute__((always_inline)) void filter_columns(
    const uint8_t *src, int64_t stride, const Spans *rows, int64_t y, float *restrict line) {
  const uint8_t *first = src + rows->first[y] * stride;
  const float *weights = rows->weights + y * rows->taps;
  for (int64_t i = 0; i < stride; ++i) line[i] = weights[0] * (float)first[i];
  for (int k = 1; k < rows->taps; ++k) {
    const uint8_t *source = first + k * stride;
    const float w = weights[k];
    for (int64_t i = 0; i < stride; ++i) line[i] += w * (float)source[i];
  }
}

/* Row filter of one column-filtered line into uint8 pixels. An RGB pixel is read as four lanes
 * (the fourth, the next pixel's red or the line's zero padding, is computed and dropped), so
 * each tap is one vector multiply-add. */
static inline __attribute__((always_inline)) void filter_row(
    const float *line, int channels, const Spans *columns, int64_t out_width, uint8_t *out) {
  const int taps = columns->taps;
  if (channels == 3) {
    const f32x4 magic = {12582912.0f, 12582912.0f, 12582912.0f, 12582912.0f};
    for (int64_t x = 0; x < out_width; ++x) {
      const float *pixel = line + 3 * (int64_t)columns->first[x];
      const float *w = columns->weights + x * taps;
      f32x4 sum = load4(pixel) * w[0];
      for (int k = 1; k < taps; ++k) sum += load4(pixel + 3 * k) * w[k];
      /* The weights are nonnegative and sum to one, so the sums stay within [0, 255] but for
       * float rounding, which rounding to a whole number takes away: no clipping is needed. */
      const i32x4 level = __builtin_convertvector((sum + magic) - magic, i32x4);
      out[3 * x] = (uint8_t)level[0];
      out[3 * x + 1] = (uint8_t)level[1];
      out[3 * x + 2] = (uint8_t)level[2];
    }
    return;
  }
  for (int64_t x = 0; x < out_width; ++x) {
    const float *pixel = line + channels * (int64_t)columns->first[x];
    const float *w = columns->weights + x * taps;
    for (int c = 0; c < channels; ++c) {
      float sum = 0.0f;
      for (int k = 0; k < taps; ++k) sum += w[k] * pixel[channels * k + c];
      out[channels * x + c] = to_level(sum);
    }
  }
}

/* The loops above are inlined here, so that each version of this function has its own. */
MULTIVERSIONED
static int resize(const uint8_t *src, int64_t height, int64_t width, int channels, uint8_t *out,
                  int64_t out_height, int64_t out_width) {
  Spans rows = {0}, columns = {0};
  const int64_t stride = width * channels;
  float *line = calloc((size_t)stride + 1, sizeof(float)); /* + 1: the last pixel's fourth lane */
  int status = -1;
  if (line == NULL || make_spans(height, out_height, &rows) ||
      make_spans(width, out_width, &columns)) {
    goto done;
  }
  for (int64_t y = 0; y < out_height; ++y) {
    filter_columns(src, stride, &rows, y, line);
    filter_row(line, channels, &columns, out_width, out + y * out_width * channels);
  }
  status = 0;
done:
  free(line);
  free_spans(&rows);
  free_spans(&columns);
  return status;
}

static PyObject *py_resize(PyObject *self, PyObject *args) {
  (void)self;
  Py_buffer src, out;
  Py_ssize_t height, width, channels, out_height, out_width;
  if (!PyArg_ParseTuple(args, "y*nnnw*nn", &src, &height, &width, &channels, &out, &out_height,
                        &out_width)) {
    return NULL;
  }
  PyObject *result = NULL;
  if (height < 1 || width < 1 || out_height < 1 || out_width < 1 || channels < 1 ||
      channels > 64 || height > INT32_MAX / 8 || width > INT32_MAX / 8 ||
      out_height > INT32_MAX / 8 || out_width > INT32_MAX / 8) {
    PyErr_Format(PyExc_ValueError, "cannot resize a %zd x %zd x %zd image to %zd x %zd", height,
                 width, channels, out_height, out_width);
  } else if (src.len != height * width * channels) {
    PyErr_Format(PyExc_ValueError, "the source holds %zd bytes, not %zd x %zd x %zd", src.len,
                 height, width, channels);
  } else if (out.len != out_height * out_width * channels) {
    PyErr_Format(PyExc_ValueError, "the output holds %zd bytes, not %zd x %zd x %zd", out.len,
                 out_height, out_width, channels);
  } else {
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = resize(src.buf, height, width, (int)channels, out.buf, out_height, out_width);
    Py_END_ALLOW_THREADS
    if (status) {
      PyErr_NoMemory();
    } else {
      result = Py_NewRef(Py_None);
    }
  }
  PyBuffer_Release(&src);
  PyBuffer_Release(&out);
  return result;
}

static PyMethodDef methods[] = {
    {"resize", py_resize, METH_VARARGS,
     "resize(src, height, width, channels, out, out_height, out_width): antialiased linear "
     "resizing of a uint8 image into out, rounded half to even."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_resample",
    .m_doc = "Antialiased linear resizing of uint8 images.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__resample(void) { return PyModule_Create(&module); }
