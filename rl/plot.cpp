#include "rl/plot.h"

#include <c10/util/Exception.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>

namespace statemamba::rl {
namespace {

// The classic 5x7 font for ASCII 32..126: five columns per glyph, bit 0 the top row.
constexpr uint8_t kFont[95][5] = {
    {0x00, 0x00, 0x00, 0x00, 0x00}, {0x00, 0x00, 0x5F, 0x00, 0x00}, {0x00, 0x07, 0x00, 0x07, 0x00},  //  !"
    {0x14, 0x7F, 0x14, 0x7F, 0x14}, {0x24, 0x2A, 0x7F, 0x2A, 0x12}, {0x23, 0x13, 0x08, 0x64, 0x62},  // #$%
    {0x36, 0x49, 0x55, 0x22, 0x50}, {0x00, 0x05, 0x03, 0x00, 0x00}, {0x00, 0x1C, 0x22, 0x41, 0x00},  // &'(
    {0x00, 0x41, 0x22, 0x1C, 0x00}, {0x14, 0x08, 0x3E, 0x08, 0x14}, {0x08, 0x08, 0x3E, 0x08, 0x08},  // )*+
    {0x00, 0x50, 0x30, 0x00, 0x00}, {0x08, 0x08, 0x08, 0x08, 0x08}, {0x00, 0x60, 0x60, 0x00, 0x00},  // ,-.
    {0x20, 0x10, 0x08, 0x04, 0x02}, {0x3E, 0x51, 0x49, 0x45, 0x3E}, {0x00, 0x42, 0x7F, 0x40, 0x00},  // /01
    {0x42, 0x61, 0x51, 0x49, 0x46}, {0x21, 0x41, 0x45, 0x4B, 0x31}, {0x18, 0x14, 0x12, 0x7F, 0x10},  // 234
    {0x27, 0x45, 0x45, 0x45, 0x39}, {0x3C, 0x4A, 0x49, 0x49, 0x30}, {0x01, 0x71, 0x09, 0x05, 0x03},  // 567
    {0x36, 0x49, 0x49, 0x49, 0x36}, {0x06, 0x49, 0x49, 0x29, 0x1E}, {0x00, 0x36, 0x36, 0x00, 0x00},  // 89:
    {0x00, 0x56, 0x36, 0x00, 0x00}, {0x08, 0x14, 0x22, 0x41, 0x00}, {0x14, 0x14, 0x14, 0x14, 0x14},  // ;<=
    {0x00, 0x41, 0x22, 0x14, 0x08}, {0x02, 0x01, 0x51, 0x09, 0x06}, {0x32, 0x49, 0x79, 0x41, 0x3E},  // >?@
    {0x7E, 0x11, 0x11, 0x11, 0x7E}, {0x7F, 0x49, 0x49, 0x49, 0x36}, {0x3E, 0x41, 0x41, 0x41, 0x22},  // ABC
    {0x7F, 0x41, 0x41, 0x22, 0x1C}, {0x7F, 0x49, 0x49, 0x49, 0x41}, {0x7F, 0x09, 0x09, 0x09, 0x01},  // DEF
    {0x3E, 0x41, 0x49, 0x49, 0x7A}, {0x7F, 0x08, 0x08, 0x08, 0x7F}, {0x00, 0x41, 0x7F, 0x41, 0x00},  // GHI
    {0x20, 0x40, 0x41, 0x3F, 0x01}, {0x7F, 0x08, 0x14, 0x22, 0x41}, {0x7F, 0x40, 0x40, 0x40, 0x40},  // JKL
    {0x7F, 0x02, 0x0C, 0x02, 0x7F}, {0x7F, 0x04, 0x08, 0x10, 0x7F}, {0x3E, 0x41, 0x41, 0x41, 0x3E},  // MNO
    {0x7F, 0x09, 0x09, 0x09, 0x06}, {0x3E, 0x41, 0x51, 0x21, 0x5E}, {0x7F, 0x09, 0x19, 0x29, 0x46},  // PQR
    {0x46, 0x49, 0x49, 0x49, 0x31}, {0x01, 0x01, 0x7F, 0x01, 0x01}, {0x3F, 0x40, 0x40, 0x40, 0x3F},  // STU
    {0x1F, 0x20, 0x40, 0x20, 0x1F}, {0x3F, 0x40, 0x38, 0x40, 0x3F}, {0x63, 0x14, 0x08, 0x14, 0x63},  // VWX
    {0x07, 0x08, 0x70, 0x08, 0x07}, {0x61, 0x51, 0x49, 0x45, 0x43}, {0x00, 0x7F, 0x41, 0x41, 0x00},  // YZ[
    {0x02, 0x04, 0x08, 0x10, 0x20}, {0x00, 0x41, 0x41, 0x7F, 0x00}, {0x04, 0x02, 0x01, 0x02, 0x04},  // \]^
    {0x40, 0x40, 0x40, 0x40, 0x40}, {0x00, 0x01, 0x02, 0x04, 0x00}, {0x20, 0x54, 0x54, 0x54, 0x78},  // _`a
    {0x7F, 0x48, 0x44, 0x44, 0x38}, {0x38, 0x44, 0x44, 0x44, 0x20}, {0x38, 0x44, 0x44, 0x48, 0x7F},  // bcd
    {0x38, 0x54, 0x54, 0x54, 0x18}, {0x08, 0x7E, 0x09, 0x01, 0x02}, {0x0C, 0x52, 0x52, 0x52, 0x3E},  // efg
    {0x7F, 0x08, 0x04, 0x04, 0x78}, {0x00, 0x44, 0x7D, 0x40, 0x00}, {0x20, 0x40, 0x44, 0x3D, 0x00},  // hij
    {0x7F, 0x10, 0x28, 0x44, 0x00}, {0x00, 0x41, 0x7F, 0x40, 0x00}, {0x7C, 0x04, 0x18, 0x04, 0x78},  // klm
    {0x7C, 0x08, 0x04, 0x04, 0x78}, {0x38, 0x44, 0x44, 0x44, 0x38}, {0x7C, 0x14, 0x14, 0x14, 0x08},  // nop
    {0x08, 0x14, 0x14, 0x18, 0x7C}, {0x7C, 0x08, 0x04, 0x04, 0x08}, {0x48, 0x54, 0x54, 0x54, 0x20},  // qrs
    {0x04, 0x3F, 0x44, 0x40, 0x20}, {0x3C, 0x40, 0x40, 0x20, 0x7C}, {0x1C, 0x20, 0x40, 0x20, 0x1C},  // tuv
    {0x3C, 0x40, 0x30, 0x40, 0x3C}, {0x44, 0x28, 0x10, 0x28, 0x44}, {0x0C, 0x50, 0x50, 0x50, 0x3C},  // wxy
    {0x44, 0x64, 0x54, 0x4C, 0x44}, {0x00, 0x08, 0x36, 0x41, 0x00}, {0x00, 0x00, 0x7F, 0x00, 0x00},  // z{|
    {0x00, 0x41, 0x36, 0x08, 0x00}, {0x02, 0x01, 0x02, 0x04, 0x02},                                  // }~
};

// Matplotlib's tab10: distinct on white.
constexpr Rgb kPalette[] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44},   {214, 39, 40},  {148, 103, 189},
                            {140, 86, 75},  {227, 119, 194}, {127, 127, 127}, {188, 189, 34}, {23, 190, 207}};

void put_u32(std::string& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<char>((v >> shift) & 0xFF));
}

// A PNG chunk: length, type, data, CRC-32 of type and data.
void put_chunk(std::string& out, const char* type, const std::string& data) {
  put_u32(out, static_cast<uint32_t>(data.size()));
  const std::string body = std::string(type, 4) + data;
  out += body;
  put_u32(out, static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(body.data()), body.size())));
}

// Ticks at 1, 2 or 5 times a power of ten, about `target` of them over [lo, hi].
std::vector<double> nice_ticks(double lo, double hi, int target) {
  const double raw = (hi - lo) / target, power = std::pow(10.0, std::floor(std::log10(raw)));
  double step = power;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (raw <= m * power) {
      step = m * power;
      break;
    }
  std::vector<double> ticks;
  for (double v = std::ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) ticks.push_back(std::abs(v) < step * 1e-9 ? 0 : v);
  return ticks;
}

std::string format_tick(double v) {
  char buf[32];
  if (std::abs(v) >= 1e5 && std::fmod(v, 1000) == 0) std::snprintf(buf, sizeof buf, "%gk", v / 1000);
  else std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

}  // namespace

// ---- Image -----------------------------------------------------------------------------------------

Image::Image(int width, int height, Rgb background) : width_(width), height_(height) {
  TORCH_CHECK(width >= 1 && height >= 1, "Image: size must be positive, got ", width, "x", height);
  rgb_.resize(static_cast<size_t>(width) * height * 3);
  for (size_t i = 0; i < rgb_.size(); i += 3) rgb_[i] = background.r, rgb_[i + 1] = background.g, rgb_[i + 2] = background.b;
}

Rgb Image::at(int x, int y) const {
  const size_t i = (static_cast<size_t>(y) * width_ + x) * 3;
  return {rgb_.at(i), rgb_.at(i + 1), rgb_.at(i + 2)};
}

void Image::set(int x, int y, Rgb c) {
  if (x < 0 || y < 0 || x >= width_ || y >= height_) return;
  const size_t i = (static_cast<size_t>(y) * width_ + x) * 3;
  rgb_[i] = c.r, rgb_[i + 1] = c.g, rgb_[i + 2] = c.b;
}

void Image::fill_rect(int x0, int y0, int x1, int y1, Rgb c) {
  for (int y = std::min(y0, y1); y <= std::max(y0, y1); ++y)
    for (int x = std::min(x0, x1); x <= std::max(x0, x1); ++x) set(x, y, c);
}

void Image::line(double x0, double y0, double x1, double y1, Rgb c, int thickness, bool dashed) {
  // Steps of at most one pixel along the longer axis; each step stamps a thickness^2 square.
  const int steps = std::max(1, static_cast<int>(std::ceil(std::max(std::abs(x1 - x0), std::abs(y1 - y0)))));
  const int lo = -(thickness - 1) / 2, hi = thickness / 2;
  for (int i = 0; i <= steps; ++i, ++dash_) {
    if (dashed && dash_ % 13 >= 8) continue;
    const int x = static_cast<int>(std::lround(x0 + (x1 - x0) * i / steps));
    const int y = static_cast<int>(std::lround(y0 + (y1 - y0) * i / steps));
    fill_rect(x + lo, y + lo, x + hi, y + hi, c);
  }
}

void Image::text(int x, int y, const std::string& s, Rgb c, int scale) {
  for (size_t k = 0; k < s.size(); ++k) {
    const unsigned char ch = static_cast<unsigned char>(s[k]);
    const uint8_t* glyph = kFont[(ch >= 32 && ch <= 126 ? ch : '?') - 32];
    for (int col = 0; col < 5; ++col)
      for (int row = 0; row < 7; ++row)
        if (glyph[col] >> row & 1) {
          const int px = x + (static_cast<int>(k) * 6 + col) * scale, py = y + row * scale;
          fill_rect(px, py, px + scale - 1, py + scale - 1, c);
        }
  }
}

void Image::write_png(const std::string& path) const {
  // Every scanline starts with filter type 0 (none); zlib does the rest.
  std::string raw;
  raw.reserve(static_cast<size_t>(height_) * (width_ * 3 + 1));
  for (int y = 0; y < height_; ++y) {
    raw.push_back('\0');
    raw.append(reinterpret_cast<const char*>(&rgb_[static_cast<size_t>(y) * width_ * 3]), static_cast<size_t>(width_) * 3);
  }
  uLongf packed_size = compressBound(raw.size());
  std::string packed(packed_size, '\0');
  TORCH_CHECK(compress2(reinterpret_cast<Bytef*>(packed.data()), &packed_size, reinterpret_cast<const Bytef*>(raw.data()),
                        raw.size(), 9) == Z_OK,
              "write_png: zlib failed for ", path);
  packed.resize(packed_size);

  std::string ihdr;
  put_u32(ihdr, static_cast<uint32_t>(width_));
  put_u32(ihdr, static_cast<uint32_t>(height_));
  ihdr += std::string{8, 2, 0, 0, 0};  // bit depth 8, colour type 2 (RGB), deflate, no filter set, no interlace
  std::string png = "\x89PNG\r\n\x1a\n";
  put_chunk(png, "IHDR", ihdr);
  put_chunk(png, "IDAT", packed);
  put_chunk(png, "IEND", "");

  // A temporary name of this process's own: runs sharing an output folder may write at once.
  const std::string tmp = path + ".tmp" + std::to_string(::getpid());
  std::ofstream out(tmp, std::ios::binary);
  out.write(png.data(), static_cast<std::streamsize>(png.size()));
  out.close();
  TORCH_CHECK(out && std::rename(tmp.c_str(), path.c_str()) == 0, "write_png: cannot write ", path);
}

// ---- plot_lines ------------------------------------------------------------------------------------

void plot_lines(const std::string& path, const std::vector<Series>& series, const PlotOptions& o) {
  constexpr int kScale = 2;  // font scale: 10x14 pixel glyphs
  constexpr Rgb kBlack{0, 0, 0}, kGrid{225, 225, 225}, kGray{90, 90, 90};
  const double inf = std::numeric_limits<double>::infinity();
  double x_lo = inf, x_hi = -inf, y_lo = inf, y_hi = -inf;
  size_t legend_chars = 0;
  for (const auto& s : series) {
    TORCH_CHECK(s.x.size() == s.y.size(), "plot_lines: series '", s.label, "' has ", s.x.size(), " x and ", s.y.size(), " y values");
    legend_chars = std::max(legend_chars, s.label.size());
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (std::isnan(s.y[i])) continue;
      x_lo = std::min(x_lo, s.x[i]), x_hi = std::max(x_hi, s.x[i]);
      y_lo = std::min(y_lo, s.y[i]), y_hi = std::max(y_hi, s.y[i]);
    }
  }
  if (x_lo > x_hi) x_lo = 0, x_hi = 1, y_lo = 0, y_hi = 1;  // nothing to draw: empty axes
  y_lo = o.y_min.value_or(y_lo), y_hi = o.y_max.value_or(y_hi);
  if (x_hi - x_lo < 1e-12) x_hi = x_lo + 1;
  if (y_hi - y_lo < 1e-12) y_hi = y_lo + 1;

  Image img(o.width, o.height);
  const int char_h = Image::text_height(kScale);
  const int left = 20 + Image::text_width("00000", kScale), top = 30 + 2 * char_h;
  const int right = o.width - 30 - Image::text_width(std::string(legend_chars, ' '), kScale) - 40;
  const int bottom = o.height - 25 - 2 * char_h;
  auto px = [&](double x) { return left + (x - x_lo) / (x_hi - x_lo) * (right - left); };
  auto py = [&](double y) { return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top); };

  for (double t : nice_ticks(x_lo, x_hi, 8)) {
    const int x = static_cast<int>(std::lround(px(t)));
    img.line(x, top, x, bottom, kGrid);
    const std::string label = format_tick(t);
    img.text(x - Image::text_width(label, kScale) / 2, bottom + 8, label, kGray, kScale);
  }
  for (double t : nice_ticks(y_lo, y_hi, 6)) {
    const int y = static_cast<int>(std::lround(py(t)));
    img.line(left, y, right, y, kGrid);
    const std::string label = format_tick(t);
    img.text(left - 8 - Image::text_width(label, kScale), y - char_h / 2, label, kGray, kScale);
  }
  img.line(left, top, left, bottom, kBlack, 2);
  img.line(left, bottom, right, bottom, kBlack, 2);
  // Centred over the plot, but never off the image's left edge (a long title beside a wide legend).
  img.text(std::max(8, (left + right - Image::text_width(o.title, kScale)) / 2), 12, o.title, kBlack, kScale);
  img.text(left - Image::text_width(o.y_label, kScale) / 2, top - char_h - 10, o.y_label, kBlack, kScale);
  img.text((left + right - Image::text_width(o.x_label, kScale)) / 2, o.height - 10 - char_h, o.x_label, kBlack, kScale);

  for (size_t k = 0; k < series.size(); ++k) {
    const auto& s = series[k];
    const size_t colors = sizeof kPalette / sizeof kPalette[0];
    const Rgb c = kPalette[(s.color >= 0 ? static_cast<size_t>(s.color) : k) % colors];
    for (size_t i = 0; i + 1 < s.x.size(); ++i)
      if (!std::isnan(s.y[i]) && !std::isnan(s.y[i + 1]))
        img.line(px(s.x[i]), py(s.y[i]), px(s.x[i + 1]), py(s.y[i + 1]), c, 2, s.dashed);
    if (s.x.size() == 1 && !std::isnan(s.y[0])) img.fill_rect(px(s.x[0]) - 2, py(s.y[0]) - 2, px(s.x[0]) + 2, py(s.y[0]) + 2, c);
    const int ly = top + static_cast<int>(k) * (char_h + 10);
    img.line(right + 20, ly + char_h / 2, right + 50, ly + char_h / 2, c, 2, s.dashed);
    img.text(right + 58, ly, s.label, kBlack, kScale);
  }
  img.write_png(path);
}

}  // namespace statemamba::rl
