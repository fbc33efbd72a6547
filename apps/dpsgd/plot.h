// A small line chart written as PNG with libgd: enough for "accuracy against
// epsilon" without pulling a plotting stack into a C++ program.
#pragma once

#include <string>
#include <vector>

namespace dpsgd {

struct Series {
  std::string name;
  std::vector<double> x, y;
};

// Writes a 800x500 PNG; throws std::runtime_error if the file cannot be written
// or there is nothing to plot.
void write_line_chart(const std::string& path, const std::string& title, const std::string& x_label,
                      const std::string& y_label, const std::vector<Series>& series);

}  // namespace dpsgd
