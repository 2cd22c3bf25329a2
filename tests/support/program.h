#pragma once
// Running the statemamba-* programs from a test: they sit in the build folder, one level above the
// test programs (build/tests/test_x).
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace statemamba::test {

// build/statemamba-<name>, found from this test program's own path.
inline std::string program_path(const std::string& name) {
  char exe[4096];
  const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) return "";
  std::string path(exe, n);
  path = path.substr(0, path.rfind('/'));
  return path.substr(0, path.rfind('/')) + "/statemamba-" + name;
}

// 'text' for /bin/sh, whatever it holds.
inline std::string shell_quote(const std::string& text) {
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

struct ProgramResult {
  int status = -1;  // exit status; -1 when it did not exit normally
  std::string out, err;
};

// Runs a /bin/sh command line (pipes and redirections allowed), capturing its stdout.
inline ProgramResult run_shell(const std::string& command) {
  ProgramResult r;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) return r;
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) r.out.append(buffer, n);
  const int status = ::pclose(pipe);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// Runs the program with these arguments (no shell interpretation of them), capturing stdout and
// stderr apart. `err_file` is a scratch path for stderr.
inline ProgramResult run_program(const std::string& program, const std::vector<std::string>& args,
                                 const std::string& err_file) {
  std::string command = shell_quote(program);
  for (const auto& a : args) command += " " + shell_quote(a);
  ProgramResult r = run_shell(command + " 2>" + shell_quote(err_file));
  std::ifstream in(err_file, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  r.err = s.str();
  return r;
}

}  // namespace statemamba::test
