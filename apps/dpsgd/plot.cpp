#include "plot.h"

#include <gd.h>
#include <gdfonts.h>
#include <gdfontmb.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>

namespace dpsgd {
namespace {

// Tick spacing of 1, 2 or 5 times a power of ten giving about `n` ticks.
double nice_step(double span, int n) {
  double raw = span / n, p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * p >= raw) return m * p;
  return 10 * p;
}

std::string fmt(double v, double step) {
  char buf[32];
  int decimals = step >= 1 ? 0 : int(std::ceil(-std::log10(step)));
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

}  // namespace

void write_line_chart(const std::string& path, const std::string& title, const std::string& x_label,
                      const std::string& y_label, const std::vector<Series>& series) {
  double x0 = std::numeric_limits<double>::infinity(), x1 = -x0, y0 = x0, y1 = -x0;
  for (const auto& s : series)
    for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      x0 = std::min(x0, s.x[i]), x1 = std::max(x1, s.x[i]);
      y0 = std::min(y0, s.y[i]), y1 = std::max(y1, s.y[i]);
    }
  if (!std::isfinite(x0)) throw std::runtime_error("plot: no finite points to draw in " + path);
  if (x1 - x0 < 1e-12) x0 -= 0.5, x1 += 0.5;
  if (y1 - y0 < 1e-12) y0 -= 0.5, y1 += 0.5;
  const double xs = nice_step(x1 - x0, 6), ys = nice_step(y1 - y0, 6);
  x0 = std::floor(x0 / xs) * xs, x1 = std::ceil(x1 / xs) * xs;
  y0 = std::floor(y0 / ys) * ys, y1 = std::ceil(y1 / ys) * ys;

  const int W = 800, H = 500, L = 80, R = 30, T = 50, B = 60;
  gdImagePtr im = gdImageCreateTrueColor(W, H);
  const int white = gdTrueColor(255, 255, 255), black = gdTrueColor(0, 0, 0), grey = gdTrueColor(220, 220, 220);
  const int palette[] = {gdTrueColor(31, 119, 180), gdTrueColor(255, 127, 14), gdTrueColor(44, 160, 44),
                         gdTrueColor(214, 39, 40), gdTrueColor(148, 103, 189)};
  gdImageFilledRectangle(im, 0, 0, W - 1, H - 1, white);
  auto px = [&](double x) { return L + int(std::lround((x - x0) / (x1 - x0) * (W - L - R))); };
  auto py = [&](double y) { return H - B - int(std::lround((y - y0) / (y1 - y0) * (H - T - B))); };
  gdFontPtr small = gdFontGetSmall(), big = gdFontGetMediumBold();
  auto text = [&](gdFontPtr f, int x, int y, const std::string& s) {
    gdImageString(im, f, x, y, reinterpret_cast<unsigned char*>(const_cast<char*>(s.c_str())), black);
  };
  for (double x = x0; x <= x1 + xs / 2; x += xs) {
    gdImageLine(im, px(x), T, px(x), H - B, grey);
    std::string s = fmt(x, xs);
    text(small, px(x) - int(s.size()) * small->w / 2, H - B + 6, s);
  }
  for (double y = y0; y <= y1 + ys / 2; y += ys) {
    gdImageLine(im, L, py(y), W - R, py(y), grey);
    std::string s = fmt(y, ys);
    text(small, L - 8 - int(s.size()) * small->w, py(y) - small->h / 2, s);
  }
  gdImageRectangle(im, L, T, W - R, H - B, black);
  text(big, (W - int(title.size()) * big->w) / 2, 15, title);
  text(small, (W - int(x_label.size()) * small->w) / 2, H - B + 28, x_label);
  gdImageStringUp(im, small, 15, (H + int(y_label.size()) * small->w) / 2,
                  reinterpret_cast<unsigned char*>(const_cast<char*>(y_label.c_str())), black);
  gdImageSetThickness(im, 2);
  for (size_t k = 0; k < series.size(); ++k) {
    const auto& s = series[k];
    int color = palette[k % 5], prev_x = -1, prev_y = -1;
    for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      int cx = px(s.x[i]), cy = py(s.y[i]);
      if (prev_x >= 0) gdImageLine(im, prev_x, prev_y, cx, cy, color);
      gdImageFilledEllipse(im, cx, cy, 6, 6, color);
      prev_x = cx, prev_y = cy;
    }
    // Legend, bottom right inside the frame (accuracy curves rise to the top left).
    size_t longest = 0;
    for (const auto& other : series) longest = std::max(longest, other.name.size());
    const int lx = W - R - 10 - 36 - int(longest) * small->w, ly = H - B - 10 - int(series.size() - k) * 16;
    gdImageLine(im, lx, ly + small->h / 2, lx + 20, ly + small->h / 2, color);
    text(small, lx + 26, ly, s.name);
  }
  gdImageSetThickness(im, 1);
  FILE* out = std::fopen(path.c_str(), "wb");
  if (!out) {
    gdImageDestroy(im);
    throw std::runtime_error("plot: cannot write " + path);
  }
  gdImagePng(im, out);
  std::fclose(out);
  gdImageDestroy(im);
}

}  // namespace dpsgd
